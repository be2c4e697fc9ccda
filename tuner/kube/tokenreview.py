"""Ask the API server who a bearer token belongs to (authentication.k8s.io/v1 TokenReview),
for the sidecar's caller check (tuner.sidecar_auth.ServiceAccountCaller).

RBAC: the asking ServiceAccount needs `create` on `tokenreviews` in API group
`authentication.k8s.io`, a cluster-scoped resource, so a ClusterRole and a
ClusterRoleBinding (manifests/base/rbac.yaml: ClusterRole tuner-sidecar-tokenreview).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tuner.errors import KubeForbidden
from tuner.kube.client import api_errors
from tuner.sidecar_auth import Review

#: (connect, read) seconds: a caller waits for this review, so it is short
REVIEW_TIMEOUT = (3, 5)


def token_reviewer(connection: Any, *, audience: str) -> Callable[[str], Review]:
    """A function that reviews one token for `audience` ("" = the API server's own)."""
    from kubernetes import client

    core, host, context = connection
    api = client.AuthenticationV1Api(core.api_client)

    def review(token: str) -> Review:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(
            token=token, audiences=[audience] if audience else None))
        try:
            with api_errors("create", "(cluster scope)", "", host, context,
                            resource="tokenreviews", kind="TokenReview"):
                answer = api.create_token_review(body, _request_timeout=REVIEW_TIMEOUT)
        except KubeForbidden as exc:
            raise KubeForbidden(
                "forbidden: the sidecar's ServiceAccount may not create tokenreviews "
                "(authentication.k8s.io); bind it to ClusterRole tuner-sidecar-tokenreview "
                "(manifests/base/rbac.yaml)") from exc
        status = answer.status
        if status is None:
            return Review(False, error="the TokenReview came back without a status")
        return Review(authenticated=bool(status.authenticated),
                      username=(status.user.username or "") if status.user else "",
                      error=status.error or "")
    return review
