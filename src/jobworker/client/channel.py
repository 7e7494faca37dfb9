"""The channel to the server: its TLS credentials, its options, and why it could not connect."""

from __future__ import annotations

import grpc

from jobworker.client.config import ClientConfig, Credentials
from jobworker.client.errors import ClientError

MAX_RECEIVE_MESSAGE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int | str], ...] = (
    # Notice a dead server on a quiet follow stream: ping every 30s, without the default
    # cap of two pings between data frames. The server permits this rate
    # (server/app.py: min_recv_ping_interval_without_data_ms, max_ping_strikes).
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", MAX_RECEIVE_MESSAGE_BYTES),
    # gRPC's own reconnect backoff grows to 120s; follow() retries for 60s at most
    # 5s apart, and each retry must find the channel willing to connect again.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


def channel_credentials(credentials: Credentials) -> grpc.ChannelCredentials:
    """gRPC's credentials from checked PEMs."""
    return grpc.ssl_channel_credentials(
        root_certificates=credentials.ca,
        private_key=credentials.key,
        certificate_chain=credentials.cert,
    )


def channel_options(config: ClientConfig) -> list[tuple[str, int | str]]:
    """The options of every channel to the server."""
    options = list(CHANNEL_OPTIONS)
    if config.server_name_override:
        options.append(("grpc.ssl_target_name_override", config.server_name_override))
    return options


def explained(config: ClientConfig, credentials: Credentials, err: ClientError) -> ClientError:
    """`err` with a hint of why the server could not be reached, when it is that."""
    if not err.unreachable or err.hint:
        return err
    from jobworker.client.tls import explain_unreachable

    err.hint = (
        explain_unreachable(
            config.server,
            credentials.ca,
            credentials.cert,
            credentials.key,
            config.server_name_override,
        )
        or ""
    )
    return err
