"""The Streamlit dashboard: ``streamlit run app/Home.py`` (pages in ``app/pages``, helpers in ``app/views``)."""
