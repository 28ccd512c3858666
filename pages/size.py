"""/size on a fresh server's first run (legacy pages/ mode): hand it to the router, which opens Size & scale overhead."""

from pages.navigation import route

route()
