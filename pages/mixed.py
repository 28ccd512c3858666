"""/mixed on a fresh server's first run (legacy pages/ mode): hand it to the router, which opens Mixed precision."""

from pages.navigation import route

route()
