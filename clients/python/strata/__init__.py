"""Python client for stratad, the Strata KV-cache store.

- :class:`Client`: the gRPC API, synchronous, over TCP or a Unix socket;
- :class:`AsyncClient` (``strata.aio``): the same, for asyncio;
- :class:`LocalClient` (``strata.local``): the zero-copy local data plane
  (the daemon's arena mapped, numpy views of slots);
- :mod:`strata.errors`: typed errors carrying the gRPC status and message;
- :mod:`strata.auth`: :class:`Credentials` (a bearer token, TLS, a client
  certificate) for daemons that authenticate TCP clients;
- :mod:`strata.keys`: chained block keys from token ids;
- :mod:`strata.merge`: the exact log-sum-exp merge of partial attention
  (``Client.attend`` answers merged with the engine's own part);
- :mod:`strata.integrations`: vLLM, SGLang and LMCache adapters.
"""

from .aio import AsyncClient
from .auth import Credentials, credentials_from
from .client import DEFAULT_ENDPOINT, Client
from .errors import (AlreadyExists, ArenaChanged, DataLoss, DeadlineExceeded, FailedPrecondition,
                     InvalidArgument, NotFound, PermissionDenied, ResourceExhausted, StrataError,
                     Unauthenticated, Unavailable)
from .local import LocalClient
from .types import (AttendMode, AttendResult, AttendSequence, Block, BuildIndexResult,
                    DeleteResult, Dtype, HeadHits, IndexState, IndexStatus, KvKind, Layout, Lease,
                    LookupResult, Namespace, PutOutcome, PutResult, RetrieveResult, RetrieveSource,
                    StoredBlock, Tier, TierRead, checksum)

__version__ = "0.1.0"

__all__ = [
    "AsyncClient", "Client", "LocalClient", "DEFAULT_ENDPOINT", "Credentials", "credentials_from",
    "StrataError", "InvalidArgument", "NotFound", "AlreadyExists", "PermissionDenied",
    "FailedPrecondition", "ResourceExhausted", "Unavailable", "DeadlineExceeded", "DataLoss",
    "Unauthenticated",
    "ArenaChanged",
    "AttendMode", "AttendResult", "AttendSequence", "TierRead",
    "BuildIndexResult", "HeadHits", "IndexState", "IndexStatus", "RetrieveResult", "RetrieveSource",
    "Block", "DeleteResult", "Dtype", "KvKind", "Layout", "Lease", "LookupResult", "Namespace",
    "PutOutcome", "PutResult", "StoredBlock", "Tier", "checksum",
]
