# The two commands of the README. Each installs what is missing first (scripts/setup).
.PHONY: demo test lint setup

setup:
	@./scripts/setup

demo: setup
	.venv/bin/tuner demo

test: setup lint
	.venv/bin/pytest

lint: setup
	.venv/bin/ruff check tuner tests bench locustfiles
	.venv/bin/mypy
