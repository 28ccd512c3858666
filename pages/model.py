"""/model on a fresh server's first run (legacy pages/ mode): hand it to the router, which opens Model."""

from pages.navigation import route

route()
