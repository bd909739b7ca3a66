"""``python -m tokentrail.proxy.recorder.main --socket PATH``: the host's recorder process.

Started by ``tokentrail serve`` (``keeper.py``), never by hand. Its settings are the proxy's
(``TOKENTRAIL_*``); its spool is the configured ``TOKENTRAIL_FALLBACK_PATH``, claimed for its life.
SIGTERM (which the kernel also sends when the process that started it dies): the relays are given
the grace period to hand over their last records, then everything queued is written, then it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from tokentrail.proxy.recorder.assembly import make_writer
from tokentrail.proxy.recorder.service import RecorderService
from tokentrail.proxy.recording.spool import SpoolClaim, SpoolInUseError
from tokentrail.proxy.server.workers import die_with_supervisor
from tokentrail.proxy.settings import Settings
from tokentrail.proxy.storage.engine import make_engine

logger = logging.getLogger("tokentrail.proxy.recorder")


async def _serve(settings: Settings, socket_path: Path) -> None:
    engine = make_engine(settings.db, settings.db_busy_timeout_ms)
    writer = make_writer(settings, engine, settings.fallback_path)
    writer.start()
    service = RecorderService(writer, socket_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await service.start()
    logger.info("socket=<%s> | recorder ready", socket_path)
    await stop.wait()
    await service.stop(settings.graceful_shutdown_s)
    engine.dispose()
    logger.info("written=<%d>, failed=<%d> | recorder stopped", writer.written, writer.failed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TokenTrail's recorder process (started by serve)")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    die_with_supervisor(args.parent_pid)
    try:
        claim = SpoolClaim(settings.fallback_path)
    except SpoolInUseError as exc:
        logger.error("error=<%s> | recorder cannot start", exc)
        return 2
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve(settings, args.socket))
    finally:
        claim.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
