"""QuantLab: the Streamlit entry point. Routes over the pages in pages/ (filled in by the app issue)."""

import streamlit as st

st.set_page_config(page_title="QuantLab", page_icon="🔬", layout="wide")


def landing() -> None:
    st.title("QuantLab")
    st.write("See what post-training quantization does to a language model.")


st.navigation([st.Page(landing, title="Home", default=True)]).run()
