"""quality page (in progress)."""

import streamlit as st

st.title("quality")
st.info("This page is being built.")
