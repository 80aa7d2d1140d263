"""The Flower ClientApp of aldm-fed (loaded by Flower on each site's SuperNode).

All the work is in `aldm_fed.federation.site`; every reply passes the allow-list of
`aldm_fed.federation.sharing` on its way out.
"""

from aldm_fed.federation.apps import client_app

app = client_app()
