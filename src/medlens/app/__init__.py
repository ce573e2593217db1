"""The web app (`medlens app`): Streamlit page code in `page`/`tabs`, the logic it lays out in plain modules
(catalogue, inputs, maps, views, metrics, export, session, batch_runs) that are unit-tested without a browser.
"""
