"""Crash consistency of optimkit.checkpoint: training processes that save
asynchronously after every step are SIGKILLed at random moments (many in the
middle of a write); after each kill the latest published checkpoint loads
(its SHA-256 matches the manifest) and holds exactly the state an uninterrupted
run has at the step it claims. Each trial resumes from the previous trial's
checkpoint in the same directory, so resumption after a crash is tested too.
A control runs the same kills on a deliberately broken writer (manifest
published before the file is written) and must see the check fail.
(SIGKILL loses the process, not the page cache: what fsync adds against power
loss is not exercised here.)"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from optimkit import checkpoint_io as cio
import checkpoint_crash_worker as worker

TRIALS, CHAINS = 24, 4
CONTROLS = 6  # trials of a deliberately broken writer (manifest before file): the check must fail them


def _in_flight(directory: str, listed: set) -> str | None:
    """What a kill interrupted, judged from the files left behind."""
    names = os.listdir(directory)
    if any(cio._TMP in n and n.startswith("step-") for n in names):
        return "checkpoint write"
    if any(n.startswith("step-") and cio._TMP not in n and n not in listed for n in names):
        return "between the checkpoint's rename and the manifest"
    if any(n.startswith(cio.MANIFEST + cio._TMP) for n in names):
        return "manifest write"
    return None


@pytest.mark.slow
def test_latest_checkpoint_survives_sigkill_at_random_moments(tmp_path):
    rng = random.Random(20261203)
    chains = [tmp_path / f"run{c}" for c in range(CHAINS)]
    log = open(tmp_path / "server.log", "w")
    src = os.path.dirname(os.path.dirname(cio.__file__))  # the server imports the optimkit this test imported
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([src] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    server = subprocess.Popen([sys.executable, worker.__file__, "serve"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    claims, hits, last, advanced = [], [], {}, 0

    def trial(request: dict) -> None:
        server.stdin.write(json.dumps(request) + "\n")
        server.stdin.flush()
        reply = json.loads(server.stdout.readline() or "null")
        assert reply == {"killed": True}, (reply, (tmp_path / "server.log").read_text())

    caught = []
    try:
        for i in range(CONTROLS):  # the control: the same kills must expose a broken writer
            directory = str(tmp_path / f"broken{i}")
            trial({"dir": directory, "delay": rng.uniform(0.4, 1.0), "broken": True})
            try:
                cio.AsyncCheckpointer(directory).load_latest()
            except (cio.CheckpointError, FileNotFoundError) as e:
                caught.append(type(e).__name__)
        assert caught, f"none of {CONTROLS} kills of a writer that publishes before writing was detected"
        for i in range(TRIALS):
            directory = str(chains[i % CHAINS])
            # a chain's first trial runs long enough to publish something to resume from
            delay = 1.0 if i < CHAINS else rng.uniform(0.1, 0.8)
            trial({"dir": directory, "delay": delay})
            if not os.path.isdir(directory):
                continue
            reader = cio.AsyncCheckpointer(directory)
            infos = reader.checkpoints()
            hits.append(_in_flight(directory, {os.path.basename(c.path) for c in infos}))
            if not infos:
                continue
            step, saved = reader.load_latest()  # the SHA-256 is checked against the manifest
            assert saved["step"] == step
            assert step >= last.get(directory, 0), "a later trial published an older step"
            advanced += directory in last and step > last[directory]  # resumed and trained on
            last[directory] = step
            claims.append((i, step, worker.digest(saved)))
    finally:
        server.stdin.close()  # the server ends after the trial in progress
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    during = [h for h in hits if h is not None]
    assert len(claims) >= TRIALS // 2, f"too few trials published anything: {claims}"
    assert len(during) >= TRIALS // 4, f"only {len(during)} of {TRIALS} kills hit a write: {hits}"
    assert advanced >= TRIALS // 4, f"only {advanced} trials resumed and published a later step"
    want = worker.reference_states(s for _, s, _ in claims)
    bad = [(i, s) for i, s, d in claims if d != want[s]]
    assert not bad, f"checkpoints whose contents differ from the uninterrupted run at their step: {bad}"
    print(f"{TRIALS} kills: {len(during)} during a write ({sorted(set(during))}); "
          f"{advanced} resumed and advanced; steps reached per run: {sorted(last.values())}; "
          f"control: {len(caught)} of {CONTROLS} broken-writer kills detected")
