"""`flclustering export`: a running aggregator's newest global model as a model file.

For federations started as services (by hand, or on Kubernetes) rather than by a run
command: an operator fetches the model over gRPC (`GetModel`, read-only, allowed to the
clusterer and operators) and writes `model.safetensors` and `model.json`, as every run
does, for `flclustering predict` and anyone with safetensors. The aggregator has no data,
so the card's normalisation and class names come from the dataset here (`--dataset`,
`--data-dir`: the same settings, flags or `FLCLUSTERING_*` variables, the services ran
with); the weights must fit `--model` on that dataset or nothing is written.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from services.common.homomorphic import KIND as HE_KIND
from services.common.homomorphic import load_keys, open_model
from services.common.pb.flclustering.v1 import aggregator_pb2 as agg_pb
from services.common.pb.flclustering.v1 import aggregator_pb2_grpc as agg_grpc
from services.common.streams import read_model
from services.common.wire import WireError
from services.core.ckks import PayloadError as HePayloadError
from services.core.errors import ConfigError, FLClusteringError
from services.core.model_file import write_model_file
from services.experiment import ExportConfig
from services.transport.client import call_metadata, channel

EXPORT_TIMEOUT_S = 600.0  # a large model over a slow link


class ExportError(FLClusteringError):
    """The aggregator refused or could not be reached; one line for the operator."""


def export_model(
    config: ExportConfig, aggregator: str, identity: str, server_name: str | None = None
) -> tuple[int, list[Path]]:
    """Fetch the aggregator's newest global model and write it with its card into
    `config.run.out`; its version and the paths written (both files, or neither)."""
    from services.core.models import build_model
    from services.core.tensors import check_spec, spec_of
    from services.local import described
    from services.transport.credentials import load_tls

    fed = config.federation
    transport = config.transport
    if transport.tls_dir and (transport.auth_token or transport.auth_token_file):
        raise ConfigError("--tls-dir and --auth-token exclude each other: use one")
    out = Path(config.run.out)
    try:
        out.mkdir(parents=True, exist_ok=True)  # a bad --out is found before the download
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: {exc.strerror}") from None
    about = described(fed, config.data, config.sample)  # the card's facts, before any call
    # The named certificate only (no tls.crt fallback): a refusal names who really called.
    client = load_tls(transport.tls_dir, identity, fallback=False) if transport.tls_dir else None
    metadata = call_metadata(None if client else transport.token())
    stub = agg_grpc.AggregatorStub(channel(aggregator, None, server_name, client=client))
    try:
        status = stub.GetAggregatorStatus(
            agg_pb.GetAggregatorStatusRequest(), metadata=metadata, timeout=30
        )
        header, weights = read_model(  # -1: the newest, whichever it is by now
            stub.GetModel(
                agg_pb.GetModelRequest(model_version=-1),
                metadata=metadata,
                timeout=EXPORT_TIMEOUT_S,
            ),
            transport.max_update_bytes,
        )
    except grpc.RpcError as exc:
        raise ExportError(_refused(exc, aggregator, identity, client is not None)) from None
    except WireError as exc:
        raise ExportError(
            f"the aggregator at {aggregator} sent a bad model stream: {exc}"
        ) from None
    model = build_model(fed.model, about.input_shape, about.outputs)
    if header.kind == HE_KIND:  # --secure he: only a holder of the secret key reads it
        keys = load_keys(transport.he_key, transport.tls_dir, secret=True)
        try:
            weights = open_model(weights, keys, spec_of(model.state_dict()))
        except HePayloadError as exc:
            raise ExportError(f"the aggregator's encrypted model: {exc}") from None
    try:
        check_spec(weights, spec_of(model.state_dict()))
    except FLClusteringError as exc:
        raise ConfigError(
            f"the aggregator's model is not --model {fed.model} on --dataset {fed.dataset} "
            f"({exc}): export with the settings the services run with"
        ) from None
    facts = {
        "strategy": status.policy.strategy,
        "model_version": int(header.model_version),
        "aggregator": aggregator,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    card = about.card(facts)
    try:  # written aside, then moved in: a failure leaves no half of a model file
        with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as tmp:
            written = write_model_file(Path(tmp), weights, card)
            paths = [out / p.name for p in written]
            for source, target in zip(written, paths, strict=True):
                os.replace(source, target)
    except OSError as exc:
        raise ConfigError(f"cannot write --out {out}: {exc.strerror or exc}") from None
    return int(header.model_version), paths


def _refused(exc: Any, aggregator: str, identity: str, tls: bool) -> str:
    code = exc.code()
    detail = (exc.details() or "").splitlines()[0] if exc.details() else ""
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return (
            f"the aggregator at {aggregator} refused {identity!r}: only the clusterer and "
            f"operators may read its model (use an operator's certificate) [{detail}]"
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        hint = (
            "; over TLS, check that --aggregator (or --tls-server-name) is a name its "
            "certificate carries, e.g. aggregator through a port-forward"
            if tls
            else ""
        )
        return f"cannot reach the aggregator at {aggregator}: {code.name} ({detail}){hint}"
    return f"the aggregator at {aggregator} answered {code.name}: {detail}"
