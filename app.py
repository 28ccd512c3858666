"""QuantLab: the Streamlit entry point. The shared sidebar, then routing over the pages in pages/."""

import streamlit as st

from pages.common import sidebar

st.set_page_config(page_title="QuantLab", page_icon="🔬", layout="wide")

# Page files end in "_page" and every url_path differs from its file's stem: Streamlit's legacy pages/
# folder mode (still consulted on a process's first run, and on every AppTest run) would otherwise
# match a URL to pages/<url>.py and run that file alone, without this script's sidebar.
PAGES = [
    st.Page("pages/home_page.py", title="QuantLab", icon=":material/home:", url_path="home", default=True),
    st.Page("pages/model_page.py", title="Model", icon=":material/account_tree:", url_path="model"),
    st.Page("pages/playground_page.py", title="Playground", icon=":material/calculate:", url_path="playground"),
    st.Page("pages/weights_page.py", title="Weights", icon=":material/bar_chart:", url_path="weights"),
    st.Page("pages/outliers_page.py", title="Outliers", icon=":material/scatter_plot:", url_path="outliers"),
    st.Page("pages/clipping_page.py", title="Clipping", icon=":material/content_cut:", url_path="clipping"),
    st.Page("pages/size_page.py", title="Size & scale overhead", icon=":material/straighten:", url_path="size"),
    st.Page("pages/quality_page.py", title="Quality vs bits", icon=":material/show_chart:", url_path="quality"),
    st.Page("pages/compare_page.py", title="Compare", icon=":material/compare_arrows:", url_path="compare"),
]

page = st.navigation(PAGES)
sidebar()
page.run()
