"""Small view helpers shared by the dashboard pages.

- ``state``: tracking URI and run selection in ``st.session_state``, run pickers.
- ``loaders``: ``st.cache_data`` wrappers around ``analysis.io`` keyed by run version.
- ``charts``: pure Plotly figure builders (no Streamlit).
- ``errors``: one line on the page for an unexpected error, for pages and auto-refreshing fragments.
"""
