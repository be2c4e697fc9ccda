-- The same request the Locust benchmark user sends.
wrk.method = "POST"
wrk.body = '{"bench": true}'
wrk.headers["Content-Type"] = "application/json"
