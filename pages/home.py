"""/home on a fresh server's first run (legacy pages/ mode): hand it to the router, which opens QuantLab (the home page)."""

from pages.navigation import route

route()
