"""QuantLab: the Streamlit entry point. The pages and the router live in pages/navigation.py."""

from pages.navigation import route

route()
