"""The app's pages and its router: app.py calls route() on every run; so does every legacy-mode alias.

Why the aliases (pages/home.py, pages/quality.py, ...): Streamlit still runs a fresh server's first script run
in its legacy pages/ folder mode (`PagesManager.uses_pages_directory`; only a call to st.navigation switches a
process out of it). In that run a URL is matched against the *files* in pages/: /quality finds nothing (a
"Page not found" dialog that stays) and /common or /runs runs that module alone on a blank page. One alias file
per URL, each calling route(), makes that first run open the page the URL names, with its sidebar; and
`client.showSidebarNavigation = false` (.streamlit/config.toml) keeps the folder's raw file list from ever
being drawn. route() draws its own navigation (page links in the sidebar) before anything heavy is imported, so
the first paint does not wait for torch.
"""

import sys

import streamlit as st

# No url_path may equal a *_page.py file's stem: the legacy mode (every AppTest run, a server's first run) finds
# a page by its hash, which is the url_path's, and would run that file alone, without the sidebar.
PAGES = [
    st.Page("pages/home_page.py", title="QuantLab", icon=":material/home:", url_path="quantlab", default=True),
    st.Page("pages/model_page.py", title="Model", icon=":material/account_tree:", url_path="model"),
    st.Page("pages/playground_page.py", title="Playground", icon=":material/calculate:", url_path="playground"),
    st.Page("pages/weights_page.py", title="Weights", icon=":material/bar_chart:", url_path="weights"),
    st.Page("pages/outliers_page.py", title="Outliers", icon=":material/scatter_plot:", url_path="outliers"),
    st.Page("pages/clipping_page.py", title="Clipping", icon=":material/content_cut:", url_path="clipping"),
    st.Page("pages/size_page.py", title="Size & scale overhead", icon=":material/straighten:", url_path="size"),
    st.Page("pages/quality_page.py", title="Quality vs bits", icon=":material/show_chart:", url_path="quality"),
    st.Page("pages/compare_page.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
    st.Page("pages/mixed_page.py", title="Mixed precision", icon=":material/tune:", url_path="mixed"),
]


# Pages that do not use the sidebar's format panel: this line stands in its place there (the panel's settings
# are kept for the pages that use it: Home, where a visit starts, Model, Weights and Clipping).
FORMAT_NOTES = {
    "playground": "Not used on this page: the Playground has its own bits, grid and group controls, beside the values.",
    "outliers": "Not used on this page: outlier channels belong to the weights and activations, not to a format.",
    "size": "Not used on this page: it lists every format side by side.",
    "quality": "Not used on this page: it runs the configurations in its own list (Configurations).",
    "compare": "Not used on this page: it compares the configurations in its own list.",
}


def _home_alias() -> None:
    st.switch_page(PAGES[0])


# The default page lives at "/", so a shared "/home" link needs a page of its own that forwards there.
HOME_ALIAS = st.Page(_home_alias, title="QuantLab", url_path="home", visibility="hidden")


def route() -> None:
    """Page config, navigation and the shared sidebar, then the page the URL names."""
    st.set_page_config(page_title="QuantLab", page_icon="🔬", layout="wide")
    page = st.navigation([*PAGES, HOME_ALIAS], position="hidden")
    with st.sidebar:
        for entry in PAGES:
            st.page_link(entry)
    # Imported here, after the navigation is drawn: pages.common pulls in torch and transformers, which take
    # seconds on a process's first run only (later imports are a dictionary look-up, and get no spinner).
    if "pages.common" not in sys.modules:
        with st.spinner("Starting QuantLab (loading PyTorch)..."):
            import pages.common  # noqa: F401
    from pages.common import sidebar

    sidebar(FORMAT_NOTES.get(page.url_path))
    page.run()


if __name__ == "__main__":
    route()
