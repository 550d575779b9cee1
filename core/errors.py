"""The exception tree, split by what the caller does next; `core.http` answers each over HTTP.

ResearchFlowError
├── InvalidRequest        the request is malformed: 400 (or its own status), nothing written
│   ├── InvalidResource   the JSON is a resource the validation rejects: 422
│   └── (receiver.body)   BodyTooLarge 413, UnsupportedEncoding / UnsupportedMediaType 415
├── Unauthorized          missing or invalid credentials: 401 with a challenge
├── NotFound              no such thing of ours (a view): 404
├── DependencyUnavailable Redis / PostgreSQL / HAPI cannot be reached: 503 / exit 1
│   ├── SpeedLayerUnavailable  Redis (the receiver answers 503 + Retry-After)
│   ├── BatchLayerUnavailable  PostgreSQL
│   └── FhirTemporaryError     HAPI: retry later (connection errors, 408, 429, 5xx)
├── FhirError             HAPI answered with an error
│   ├── FhirTemporaryError
│   └── FhirFatalError       do not retry (other 4xx), carries HAPI's OperationOutcome text
│       └── EndlessPaging    pages that bring nothing new keep naming a next page
├── StartupError          a command cannot start (a port taken, a dependency down): exit 1
└── InvalidViewDefinition a SQL-on-FHIR ViewDefinition we cannot evaluate
"""

from __future__ import annotations

import re
from dataclasses import dataclass


class ResearchFlowError(Exception):
    """Base of every error this project raises on purpose."""


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome issue: what is wrong and where (a FHIRPath-like element path)."""

    code: str
    diagnostics: str
    expression: str | None = None
    severity: str = "error"


class InvalidRequest(ResearchFlowError):
    """The request is malformed (HTTP 400, or a subclass's `status_code`, with `headers`)."""

    status_code = 400
    headers: dict[str, str] = {}

    def __init__(self, message: str, issues: list[Issue] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.issues = issues or [Issue(code="invalid", diagnostics=message)]


class InvalidResource(InvalidRequest):
    """Valid JSON that the FHIR validation rejects (HTTP 422); one issue per error."""

    status_code = 422


class Unauthorized(ResearchFlowError):
    """Missing or invalid credentials (HTTP 401). `reason` says what was wrong with them, never
    what they were; `challenge` is the WWW-Authenticate value that asks for them."""

    def __init__(
        self, reason: str = "missing or invalid credentials", challenge: str = "Bearer"
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.challenge = challenge


class NotFound(ResearchFlowError):
    """Something of ours that does not exist, e.g. an unknown view (HTTP 404)."""


class DependencyUnavailable(ResearchFlowError):
    """A dependency (Redis, PostgreSQL, HAPI) cannot be reached."""


class SpeedLayerUnavailable(DependencyUnavailable):
    """Redis cannot take or answer the request."""


class BatchLayerUnavailable(DependencyUnavailable):
    """PostgreSQL cannot be reached."""


def postgres_failure(exc: BaseException, setting: str = "DATABASE_URL") -> str:
    """Why PostgreSQL could not be used, in one line: "refused" when the server answered (a
    database or role that does not exist, a password: libpq's `FATAL:` line), with the fix
    for a missing database; "cannot be reached" only when nothing answered."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    _, fatal, answer = text.partition("FATAL:")
    if not fatal:
        return f"PostgreSQL ({setting}) cannot be reached: {text}"
    answer = answer.strip()
    missing = re.match(r'database "([^"]+)" does not exist', answer)
    hint = f" (create it: createdb {missing.group(1)})" if missing else ""
    return f"PostgreSQL ({setting}) refused the connection: {answer}{hint}"


class FhirError(ResearchFlowError):
    """HAPI (the FHIR server) answered with an error or could not be reached."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code


class FhirTemporaryError(FhirError, DependencyUnavailable):
    """Worth retrying later: connection errors, 408, 429, 5xx."""


class FhirFatalError(FhirError):
    """Not worth retrying: HAPI refused the request (other 4xx)."""


class EndlessPaging(FhirFatalError):
    """The FHIR server's paging makes no progress (empty pages with ever new `next` links)."""


class StartupError(ResearchFlowError):
    """A service cannot start: a port is taken, a dependency is down. One line, exit 1."""


class InvalidViewDefinition(ResearchFlowError):
    """A SQL-on-FHIR ViewDefinition that is malformed or uses what we cannot evaluate."""
