"""The Streamlit dashboard: ``streamlit run app/Home.py`` (pages in ``app/screens``, helpers in ``app/views``)."""
