"""The ConfigMaps a recommendation becomes, built as plain values (pure).

Design decision (after lightkube): an object is built and validated completely before any
client sees it, so `tuner recommend -o configmap` and `tuner apply --dry-run` show exactly
what `tuner apply` writes, and a bad target stops everything before the first write.

Targets:
- the recommendation ConfigMap (always): every value, with provenance annotations;
- `write_back.ingress_nginx`: the ingress-nginx controller ConfigMap's
  `upstream-keepalive-timeout`, in its unit (whole seconds, rounded down: shorter is safe);
- `write_back.app`: one key of an application ConfigMap holding the upstream's idle
  setting, in milliseconds or seconds (rounded up: longer is safe). The value is the
  *setting*, already reduced by the offset measured between setting and real close (Node
  20 closes 1 s after keepAliveTimeout): the tool writes what makes the real close long
  enough, as measured, not a buffer it assumes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

from tuner import __version__
from tuner.analysis.recommend import Recommendation
from tuner.errors import ConfigError

ANNOTATION_PREFIX = "tuner.keepalive.dev"
_DNS1123 = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def check_name(what: str, value: object, *, max_length: int = 253) -> str:
    if not isinstance(value, str) or not _DNS1123.fullmatch(value) or len(value) > max_length:
        raise ConfigError(f"{what} {value!r} is not a valid Kubernetes name (lower-case "
                          "letters, digits, '-' and '.', starting and ending alphanumeric)")
    return value


def configmap(*, name: str, namespace: str, data: Mapping[str, str],
              annotations: Mapping[str, str] | None = None) -> dict[str, Any]:
    check_name("ConfigMap name", name)
    check_name("namespace", namespace, max_length=63)
    for key, value in data.items():
        if not _KEY.fullmatch(key) or len(key) > 253:
            raise ConfigError(f"ConfigMap {namespace}/{name}: key {key!r} is not a valid "
                              "ConfigMap key (letters, digits, '-', '_', '.')")
        if not isinstance(value, str):
            raise ConfigError(f"ConfigMap {namespace}/{name}: value of {key!r} must be a string")
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "labels": {"app.kubernetes.io/managed-by": "tuner"}}
    if annotations:
        metadata["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": dict(data)}


def _seconds_text(value_s: float) -> str:
    return f"{value_s:.3f}".rstrip("0").rstrip(".")


def server_snippets(proxy_idle_s: float, upstream_idle_s: float, upstream: str, *,
                    proxy: str | None = None, proxy_lifetime_ratio: float = 1.0
                    ) -> dict[str, str]:
    """How the proxies and the experiment's upstream server take the recommended values, in
    their own syntax. Only the measured upstream gets a snippet: its setting was derived from
    its own measured close, which another server would not share; with `proxy`, only that
    proxy does too. Whole-second servers are rounded up (a longer upstream idle timeout is
    the safe side). `proxy_idle_s` is already the setting, its measured lifetime ratio
    (`proxy_lifetime_ratio`) taken into account."""
    upstream_whole_s = math.ceil(round(upstream_idle_s, 6))
    snippets = {
        "nginx-snippet": f"upstream app {{ keepalive 32; "
                         f"keepalive_timeout {round(proxy_idle_s * 1000)}ms; }}",
        "envoy-snippet": f"cluster typed_extension_protocol_options HttpProtocolOptions "
                         f"common_http_protocol_options.idle_timeout: "
                         f"{round(proxy_idle_s * 1000)}ms (DestinationRule / "
                         "BackendTrafficPolicy: tuner recommend -o destinationrule | "
                         "-o backendtrafficpolicy)",
        "haproxy-snippet": f"server app ... pool-purge-delay "
                           f"{round(proxy_idle_s * 1000)}ms  # idle conns lived up to "
                           f"{max(proxy_lifetime_ratio, 1.0):.1f}x this",
        "node-snippet": f"server.keepAliveTimeout = "
                        f"{math.ceil(round(upstream_idle_s * 1000, 6))};",
        "uvicorn-snippet": f"uvicorn app:app --timeout-keep-alive {upstream_whole_s}",
        "gunicorn-snippet": f"gunicorn -k gthread --keep-alive {upstream_whole_s} app:app",
        "hypercorn-snippet": f"hypercorn --keep-alive {upstream_whole_s} app:app",
    }
    proxies = (proxy,) if proxy is not None else ("nginx", "haproxy")
    return {key: value for key, value in snippets.items()
            if key.split("-")[0] in (*proxies, upstream)}


def recommendation_configmaps(rec: Recommendation, *, name: str, namespace: str,
                              experiment_id: str, generated_at: str, proxy: str,
                              upstream: str, write_back: Mapping[str, Any] | None = None
                              ) -> list[dict[str, Any]]:
    """Every ConfigMap for `rec`: the recommendation, then the write-back targets."""
    if rec.proxy_idle_s is None or rec.upstream_idle_s is None or rec.status != "ok":
        raise ConfigError("the data does not support a recommendation, so there is nothing "
                          f"to write: {rec.more_load}")
    annotations = provenance(rec, experiment_id=experiment_id, generated_at=generated_at)
    data = {
        "proxy": proxy,
        "upstream": upstream,
        "proxy-idle-timeout-seconds": _seconds_text(rec.proxy_idle_s),
        "upstream-idle-setting-seconds": _seconds_text(rec.upstream_idle_s),
        "upstream-close-measured-seconds": _seconds_text(rec.upstream_close_s or 0.0),
        "margin-seconds": _seconds_text(rec.margin_s),
        **server_snippets(rec.proxy_idle_s, rec.upstream_idle_s, upstream,
                          proxy_lifetime_ratio=rec.proxy_lifetime_ratio),
    }
    objects = [configmap(name=name, namespace=namespace, data=data, annotations=annotations)]
    write_back = write_back or {}
    if "ingress_nginx" in write_back:
        target = write_back["ingress_nginx"]
        seconds = math.floor(rec.proxy_idle_s)
        if seconds < 1:
            raise ConfigError(f"ingress-nginx's upstream-keepalive-timeout takes whole seconds; "
                              f"the recommended {rec.proxy_idle_s:g}s rounds down to 0")
        objects.append(configmap(name=target["name"], namespace=target["namespace"],
                                 data={"upstream-keepalive-timeout": str(seconds)},
                                 annotations=annotations))
    if "app" in write_back:
        objects.append(app_configmap(rec.upstream_idle_s, write_back["app"],
                                     annotations=annotations))
    return objects


def provenance(rec: Recommendation, *, experiment_id: str, generated_at: str
               ) -> dict[str, str]:
    """The annotations every written object carries: where its values come from."""
    return {
        f"{ANNOTATION_PREFIX}/experiment-id": experiment_id,
        f"{ANNOTATION_PREFIX}/generated-at": generated_at,
        f"{ANNOTATION_PREFIX}/tuner-version": __version__,
        f"{ANNOTATION_PREFIX}/evidence": rec.evidence.text if rec.evidence else "none",
    }


def app_configmap(upstream_idle_s: float, target: Mapping[str, Any], *,
                  annotations: Mapping[str, str]) -> dict[str, Any]:
    """`write_back.app`: the app's idle setting in its ConfigMap key (rounded up)."""
    unit = target.get("unit", "ms")
    value = (math.ceil(round(upstream_idle_s * 1000, 6)) if unit == "ms"
             else math.ceil(round(upstream_idle_s, 6)))
    return configmap(name=target["name"], namespace=target["namespace"],
                     data={target["key"]: str(value)}, annotations=annotations)


def parse_write_back(value: object) -> dict[str, Any]:
    """Validate a spec's `write_back` section; errors name the key."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"write_back: {value!r} must be a mapping with ingress_nginx and/or app")
    unknown = sorted(set(value) - {"ingress_nginx", "app"})
    if unknown:
        raise ConfigError(f"write_back.{unknown[0]}: unknown target; use ingress_nginx or app")
    result: dict[str, Any] = {}
    for target, required in (("ingress_nginx", ("namespace", "name")),
                             ("app", ("namespace", "name", "key"))):
        if target not in value:
            continue
        fields = value[target]
        if not isinstance(fields, dict):
            raise ConfigError(f"write_back.{target}: {fields!r} must be a mapping")
        for key in required:
            if not isinstance(fields.get(key), str):
                raise ConfigError(f"write_back.{target}.{key}: missing or not a string")
        if fields.get("unit", "ms") not in ("ms", "s"):
            raise ConfigError(f"write_back.{target}.unit: {fields['unit']!r} is not ms or s")
        check_name(f"write_back.{target}.name", fields["name"])
        check_name(f"write_back.{target}.namespace", fields["namespace"], max_length=63)
        result[target] = dict(fields)
    return result
