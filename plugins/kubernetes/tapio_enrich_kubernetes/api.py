"""The Kubernetes API as the enricher uses it: the official client's configuration, authentication and
HTTP pool, with three GET paths called through its ``ApiClient`` rather than its generated API classes.

Importing ``CoreV1Api``, ``AppsV1Api`` and ``BatchV1Api`` (each method a pydantic-validated call) costs
the agent about 27 MB, paid on every node, for three requests; their answers are read as JSON.
"""

from __future__ import annotations

import json
import os
from typing import Any

from tapio_enrich_kubernetes.settings import KubernetesSettings

#: The API paths the enricher reads.
PODS = "/api/v1/pods"
REPLICA_SET = "/apis/apps/v1/namespaces/{namespace}/replicasets/{name}"
JOB = "/apis/batch/v1/namespaces/{namespace}/jobs/{name}"


def make_api_client(settings: KubernetesSettings) -> Any:
    """An ApiClient from ``KUBECONFIG`` if set, else the pod's service account, else ``~/.kube/config``."""
    from kubernetes import client, config

    configuration = client.Configuration()
    if settings.kubeconfig is not None:
        config.load_kube_config(config_file=str(settings.kubeconfig), client_configuration=configuration,
                                persist_config=False)
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        config.load_kube_config(client_configuration=configuration, persist_config=False)
    configuration.retries = False  # our loop retries, with backoff; urllib3's own retries would hide outages
    return client.ApiClient(configuration)


def api_get(api: Any, path: str, query: list[tuple[str, Any]], timeout: Any) -> Any:
    """GET ``path`` as the client's API classes would (bearer token, TLS, pooled connection); returns the
    urllib3 response unread, so a watch can be streamed. ``timeout`` is the client's ``_request_timeout``."""
    method, url, headers, body, post_params = api.param_serialize(
        method="GET", resource_path=path, query_params=query, header_params={"Accept": "application/json"},
        auth_settings=["BearerToken"])
    return api.call_api(method, url, headers, body, post_params, _request_timeout=timeout).response


def api_error(response: Any) -> Exception:
    """The client's ApiException for a response read here rather than by the client."""
    from kubernetes.client.exceptions import ApiException

    exc = ApiException(status=response.status, reason=response.reason)
    exc.body = response.data.decode("utf-8", "replace") if response.data else None
    return exc


def read_json(response: Any) -> dict[str, Any]:
    """The JSON body of a response, read without the client's models: those cost far more memory than the
    dozen fields read here (recent clients build pydantic models)."""
    try:
        if not 200 <= response.status < 300:
            raise api_error(response)
        return json.loads(response.data)
    finally:
        response.release_conn()


def describe_error(exc: BaseException) -> str:
    """One line for status and logs: ``HTTP 503 Service Unavailable``, or the exception's first line."""
    status = getattr(exc, "status", None)
    if status is not None:
        return f"HTTP {status} {getattr(exc, 'reason', '') or ''}".strip()
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
