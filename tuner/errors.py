"""The one error tree of `tuner`.

    TunerError                    base: the CLI prints "error: ..." and exits non-zero
     ├── ConfigError              bad input: a duration, an option, a spec field   (exit 2)
     │    └── PreflightRefused        the upstream does not serve the experiment's request,
     │                                or closes the connection after it (nothing to race)
     ├── LabError                 a local lab process failed                       (exit 3)
     │    ├── MissingProgramError     a program is not installed (names the package)
     │    ├── ProcessStartError       exited or never became ready (status, stderr tail)
     │    └── ProxyConfigError        the proxy rejected its configuration (its own message)
     ├── LoadError                load generation failed (Locust missing, crashed)   (exit 4)
     ├── ProbeError               a server could not be probed                     (exit 5)
     ├── StoreError               the results store: not ours, newer, locked, full (exit 7)
     └── KubeError                the Kubernetes API refused or was unreachable    (exit 9)
          ├── KubeNotFound            404: the object (or its namespace) does not exist
          ├── KubeConflict            409: written by someone else since we read it
          ├── KubeForbidden           403: RBAC does not grant the verb (names the Role to add)
          ├── KubeInvalid             422: the server's validation refused the object
          ├── KubeExpired             410: a watch's resourceVersion left the server's window
          ├── KubeUnreachable         no answer from the API server (retried with backoff)
          ├── KubeWaitTimeout         a rollout or the sidecars did not get there in time
          └── SidecarRefused          a sidecar answered but is set up wrong

Every message says what failed, with the values, and what to do next. Only the CLI
catches `TunerError`; bugs keep their traceback.
"""

from __future__ import annotations


class TunerError(Exception):
    """Base of every error `tuner` raises on purpose."""

    #: process exit status the CLI uses for this kind of error
    exit_code = 1


class ConfigError(TunerError):
    """Bad input: a value the user gave that cannot be used as given."""

    exit_code = 2


class PreflightRefused(ConfigError):
    """Before the first trial: the upstream did not serve the experiment's request (method,
    path, Host), or closed the connection after answering it, so no idle connection would be
    left to race and no trial could measure anything. The fix is in the input (--host,
    --path, --methods) or in the server (keep-alive)."""


class LabError(TunerError):
    """A process of the local lab failed to start, reload or stop."""

    exit_code = 3


class MissingProgramError(LabError):
    """A program the lab needs is not installed."""


class ProcessStartError(LabError):
    """A lab process exited early or never became ready."""


class ProxyConfigError(LabError):
    """The proxy rejected the configuration the lab rendered for it."""


class LoadError(TunerError):
    """Load generation failed (not a failed request: those are results)."""

    exit_code = 4


class Cancelled(TunerError):
    """Work running beside the main thread stopped because the run was interrupted (Ctrl-C
    or SIGTERM reach only the main thread; it sets the event the others watch)."""

    exit_code = 130


class StoreError(TunerError):
    """The results store cannot be read or written."""

    exit_code = 7


class ProbeError(TunerError):
    """A server could not be probed: unreachable, or not answering HTTP/1.1."""

    exit_code = 5


class KubeError(TunerError):
    """The Kubernetes API refused a request, or could not be reached."""

    exit_code = 9


class KubeNotFound(KubeError):
    """404: the object, or the namespace it would live in, does not exist."""


class KubeConflict(KubeError):
    """409: the object changed since it was read (or was created meanwhile): re-read."""


class KubeForbidden(KubeError):
    """403: the account may not do this; the message names the verb and resource to grant."""


class KubeInvalid(KubeError):
    """422: the API server's validation refused the object."""


class KubeExpired(KubeError):
    """410 Gone: a watch asked for a resourceVersion the server no longer keeps."""


class KubeUnreachable(KubeError):
    """The API server did not answer (refused, reset, timed out): worth retrying."""


class KubeWaitTimeout(KubeError):
    """A wait in the cluster ran out: a rollout never became ready, a sidecar never applied a
    generation. It fails the trial, not the experiment."""


class SidecarRefused(KubeError):
    """A sidecar answered, but refused (e.g. /probe without --app-url): no retry mends it."""
