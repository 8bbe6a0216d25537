"""The transport: everything that speaks gRPC, below the protocol's messages.

Servers and what stands in front of every handler (status mapping, authentication, the
gate, stalled streams, unparseable requests), listening ports and TLS, a service's process,
clients with bounded retries, identities and message limits. Nothing here knows the
project's messages (services.common.pb) or settings (services.common.settings): the layers
contract in pyproject.toml keeps services.common above this package.
"""
