from __future__ import annotations

import pytest

from tuner.errors import ConfigError, MissingProgramError
from tuner.lab import command_upstream, get_upstream
from tuner.lab.process import require_program


def test_unknown_upstream_lists_choices() -> None:
    with pytest.raises(ConfigError, match="node, uvicorn, gunicorn, hypercorn"):
        get_upstream("tomcat")


@pytest.mark.parametrize(("template", "message"), [
    ("node app.js {idle_ms}", "has no {port}"),
    ("node app.js {port}", "neither {idle_s} nor {idle_ms}"),
    ("node app.js {port} {idle_s} {host}", "unknown placeholder"),
    ("node app.js {port {idle_s}", "not a valid template"),
    ("node 'app.js {port} {idle_s}", "check its quotes"),
])
def test_bad_command_templates(template: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        command_upstream(template)


def test_command_template_renders_values() -> None:
    upstream = command_upstream("myserver --port {port} --idle {idle_s} --idle-ms {idle_ms}")
    argv = upstream.argv(port=8123, idle_s=2.5)
    assert argv[-1] == "myserver --port 8123 --idle 2.5 --idle-ms 2500"


def test_builtin_servers_refuse_values_they_cannot_take() -> None:
    with pytest.raises(ConfigError, match="uvicorn --timeout-keep-alive takes whole seconds"):
        get_upstream("uvicorn").argv(port=1, idle_s=1.5)
    with pytest.raises(ConfigError, match="gunicorn --keep-alive takes whole seconds"):
        get_upstream("gunicorn").argv(port=1, idle_s=0.5)
    assert get_upstream("node").argv(port=1, idle_s=1.5)[-1] == "1500"


def test_missing_program_names_the_package() -> None:
    with pytest.raises(MissingProgramError, match="apt-get install no-such-package"):
        require_program("no-such-program-tuner", package="no-such-package")
