"""/quality on a fresh server's first run (legacy pages/ mode): hand it to the router, which opens Quality vs bits."""

from pages.navigation import route

route()
