# The two commands of the README. Each installs what is missing first (scripts/setup).
.PHONY: demo test lint setup setup-test

setup:
	@./scripts/setup

setup-test:
	@./scripts/setup test

demo: setup
	.venv/bin/tuner demo

test: setup-test lint
	.venv/bin/pytest

lint: setup
	.venv/bin/ruff check tuner tests bench locustfiles
	.venv/bin/mypy
