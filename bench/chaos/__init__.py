"""The chaos suite (`make chaos`): real jobs broken on purpose, with nothing lost.

jobs.py     start/kill/watch `stockpot run` jobs; the checks every trial ends with
faults.py   SIGKILL (a rank or the job), a full disk, a hung rank (SIGSTOP)
crashes.py  a rank killed, stopped or raising inside one `stockpot run`: its restarts
tiers.py    tiered checkpoints: kills (mid-upload), a wiped node dir, an S3 outage, a stop
s3env.py    moto_server and a random-fault proxy; the S3 scenario
inputs.py   corrupted files, bad storage set-ups
report.py   chaos.json, the printed table, README's Reliability table
"""
