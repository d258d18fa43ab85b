# stockpot's supervisor (launch/supervise.py): runs the ranks as one srun step per life; after a
# transient failure it starts them all again in this allocation (at most @MAX_RESTARTS@ times),
# after a stop or once the restarts are used up it requeues the job (at most @MAX_REQUEUES@
# times), after a deterministic failure it ends the job. It, not a rank, calls scontrol: the
# ranks may run in a container without Slurm's binaries. submitit's command below never runs.
export SUBMITIT_EXECUTOR=slurm
# The time from bash itself: a `$(date)` once died under the signals of the requeue just made.
stockpot_say() { local t=$EPOCHREALTIME; printf 'stockpot supervisor: %(%F %T)T.%s %s\n' "${t%.*}" "${t: -6:3}" "$*"; }
STOCKPOT_JOB=${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}
STOCKPOT_JOB=${STOCKPOT_JOB:-$SLURM_JOB_ID}
STOCKPOT_OUT=%j
[[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && STOCKPOT_OUT=%A_%a
STOCKPOT_REQUEUES=${SLURM_RESTART_COUNT:-0}
STOCKPOT_TERM=0 STOCKPOT_TRAPPED=0 STOCKPOT_PID=""
# scancel, Slurm's own requeue or the hard time limit: end, never restart.
trap 'STOCKPOT_TERM=1 STOCKPOT_TRAPPED=1' TERM
# The life's class from its ranks' words (orchestrator/ending.py life_class) and srun's status.
stockpot_class() {
    local words count
    words=$(for f in "$1"/rank-*; do [[ -e $f ]] && head -n1 "$f"; done | sort -u | tr '\n' ' ')
    count=$(find "$1" -name 'rank-*' | wc -l)
    if [[ $words == *deterministic* ]]; then echo deterministic
    elif (($2 == 0)) || [[ $count == "$SLURM_NTASKS" && $words == "finished " ]]; then echo finished
    elif (($2 == 75)) || [[ $count == "$SLURM_NTASKS" && $words == "stopped " ]]; then echo stopped
    else echo transient; fi
}
stockpot_requeue() {
    local state
    if [[ -z $STOCKPOT_SCONTROL ]]; then
        stockpot_say "$1; cannot requeue: no scontrol on this shell's PATH; submit again to resume"
        exit "$2"
    fi
    state=$("$STOCKPOT_SCONTROL" show job -o "$STOCKPOT_JOB" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p')
    if ((STOCKPOT_TERM)) || [[ $state != RUNNING ]]; then
        stockpot_say "$1; not requeueing: the job is ${state:-ending}$( ((STOCKPOT_TERM)) && echo ', got SIGTERM')"
        exit "$2"
    fi
    if ((STOCKPOT_REQUEUES >= @MAX_REQUEUES@)); then
        stockpot_say "$1; not requeueing: requeued $STOCKPOT_REQUEUES times already (launcher.max_requeues=@MAX_REQUEUES@)"
        exit "$2"
    fi
    if "$STOCKPOT_SCONTROL" requeue "$STOCKPOT_JOB"; then
        stockpot_say "$1; requeued job $STOCKPOT_JOB (requeue $((STOCKPOT_REQUEUES + 1)) of at most @MAX_REQUEUES@)"
        exit 0
    fi
    stockpot_say "$1; scontrol requeue $STOCKPOT_JOB failed: submit again to resume"
    exit "$2"
}
STOCKPOT_LIFE=0
while :; do
    export STOCKPOT_LIFE_ID="$STOCKPOT_JOB-$STOCKPOT_REQUEUES-$STOCKPOT_LIFE"
    export STOCKPOT_END_DIR="@FOLDER@/ends/$STOCKPOT_LIFE_ID"
    mkdir -p "$STOCKPOT_END_DIR" && rm -f "$STOCKPOT_END_DIR"/rank-*
    stockpot_say "life $STOCKPOT_LIFE_ID: starting $SLURM_NTASKS rank(s) on ${SLURM_JOB_NODELIST:-?}"
    # In the background so the TERM trap runs at once. --kill-on-bad-exit=0: a rank that dies
    # must not take a commit the others are finishing with it; --wait: ranks still running
    # @WAIT_S@ s after the first one ended (a hung one) are killed.
    srun --unbuffered --open-mode=append --kill-on-bad-exit=0 --wait=@WAIT_S@ \
        --output "@FOLDER@/${STOCKPOT_OUT}_%t_log.out" --error "@FOLDER@/${STOCKPOT_OUT}_%t_log.err" \
        @COMMAND@ &
    STOCKPOT_PID=$!
    # A trap cuts `wait` short (status > 128): wait again for srun's own status; 127 means the
    # status was already taken by the wait the trap interrupted.
    STOCKPOT_RC=""
    while :; do
        STOCKPOT_TRAPPED=0
        wait "$STOCKPOT_PID"
        rc=$?
        [[ $rc == 127 && -n $STOCKPOT_RC ]] && break
        STOCKPOT_RC=$rc
        ((STOCKPOT_TRAPPED && rc > 128)) || break
    done
    STOCKPOT_PID=""
    STOCKPOT_CLASS=$(stockpot_class "$STOCKPOT_END_DIR" "$STOCKPOT_RC")
    stockpot_say "life $STOCKPOT_LIFE_ID ended: $STOCKPOT_CLASS (srun exit $STOCKPOT_RC)"
    case $STOCKPOT_CLASS in
    finished) exit 0 ;;
    deterministic)
        stockpot_say "not restarting: a restart would repeat it: $(grep -h -A1 -x deterministic "$STOCKPOT_END_DIR"/rank-* | sed -n 2p)"
        exit "$STOCKPOT_RC"
        ;;
    stopped) stockpot_requeue "stopped after committing" "$STOCKPOT_RC" ;;
    esac
    if ((STOCKPOT_TERM)); then
        stockpot_say "not restarting: the job is ending (SIGTERM)"
        exit "$STOCKPOT_RC"
    fi
    if ((STOCKPOT_LIFE >= @MAX_RESTARTS@)); then
        stockpot_requeue "transient failure, $STOCKPOT_LIFE restart(s) used (launcher.max_restarts=@MAX_RESTARTS@)" "$STOCKPOT_RC"
    fi
    STOCKPOT_LIFE=$((STOCKPOT_LIFE + 1))
    stockpot_say "transient failure: starting every rank again from the newest commit (restart $STOCKPOT_LIFE of at most @MAX_RESTARTS@)"
done
