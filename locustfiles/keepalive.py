"""Race-hunting load for `locust -f locustfiles/keepalive.py` (needs `tuner` installed).

    locust -f locustfiles/keepalive.py --headless --host http://127.0.0.1:8080 \\
        --tuner-gaps 1.99,2.0,2.01 --tuner-burst-size 30 --tuner-max-seconds 60

The implementation lives in the package (tuner/load/locust_keepalive.py) so that an
installed `tuner` can hand it to Locust; this file is the entry point people run by hand.
"""

from tuner.load.locust_keepalive import BurstShape, RaceHuntingUser

__all__ = ["BurstShape", "RaceHuntingUser"]
