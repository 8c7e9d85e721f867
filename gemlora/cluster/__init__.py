"""gemlora past one machine: engine replicas behind one HTTP API, as a Ray Serve application.

Ray is an optional extra (`pip install -e '.[ray]'`); nothing outside this package imports it.
"""
