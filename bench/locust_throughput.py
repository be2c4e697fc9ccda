"""A plain Locust user for throughput only (bench/load_throughput.py): no pacing at all."""

from locust import FastHttpUser, constant, task


class Hammer(FastHttpUser):
    wait_time = constant(0)

    @task
    def post(self) -> None:
        self.client.post("/", data='{"bench": true}')
