"""The Flower ServerApp of aldm-fed (loaded by Flower from the app bundle `aldm-fed server` stages).

All the work is in `aldm_fed.federation` (coordinator: the phases; strategy: FedAvg per phase).
"""

from aldm_fed.federation.apps import server_app

app = server_app()
