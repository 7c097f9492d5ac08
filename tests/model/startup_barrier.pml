/* tests/model/startup_barrier.pml: the startup barrier (StartupBarrier with the Coordinator's
 * on_startup), with primaries crashing at any step and the master restarting (a new
 * generation).  Written from include/workerlock/startup_barrier.hpp and coordinator.hpp
 * (promote(), read_startup_marker(), step_down_for_unreadable_marker()) as they are; see
 * tests/model/README.md.
 *
 * Processes and steps:
 *   worker(me) = one worker of the current master; its generation (StartupBarrier::
 *     generation_, by default master_generation()) is the master's at its (re)spawn.
 *     It contends for the lock (the election itself is election.pml: here one atomic step),
 *     and as the new primary runs Coordinator::promote():
 *       role_ = primary; read_startup_marker() -> StartupBarrier::query(): open + read the
 *       marker, compare with generation_ (an error: step_down_for_unreadable_marker(),
 *       release, no callbacks); unless completed: on_startup (TASKS steps; it may throw),
 *       then, if it did not throw, complete() -> write_marker(): the temporary file (open
 *       O_EXCL, write, close), then rename() over the marker; then on_promoted.
 *     A worker that does not hold the lock waits in wait_for_startup() -> wait():
 *       query() until the marker names its generation, then passes the barrier.
 *   crasher   = SIGKILL of any worker at any step (at most MAXCRASH); the master respawns it
 *               in the same generation; the kernel frees its lock.
 *   restarter = the whole server restarts (at most MAXGEN-1 times): a new master, so a new
 *               generation; every worker of the old one dies and is respawned in the new one.
 *
 * Properties (asserts):
 *   passed():    a worker passes the barrier only after the tasks of ITS generation completed
 *                (one run of all TASKS steps by one primary of that generation).
 *   serving():   a primary runs on_promoted only after the tasks of its generation completed,
 *                or when its own on_startup threw (then the Coordinator logs and carries on).
 *                So a crash mid-task makes the next primary run them again, from the start.
 * Bounds: NW workers (2), TASKS steps (2), MAXCRASH crashes (2), MAXGEN generations (2).
 *
 * Switches:
 *   -DNO_GENERATION_CHECK  mutation: query() takes any marker for "completed" (no comparison
 *                          with generation_); spin must find a worker of the new generation
 *                          passing on the old generation's marker.
 *   -DMARKER_FIRST         mutation: the marker is written before the tasks run; spin must
 *                          find a crash mid-task after which nobody runs them.
 */

#ifndef NW
#define NW 2
#endif
#ifndef TASKS
#define TASKS 2
#endif
#ifndef MAXCRASH
#define MAXCRASH 2
#endif
#ifndef MAXGEN
#define MAXGEN 2
#endif

byte gen = 1;               /* the current master's generation */
byte marker = 0;            /* the generation in <lock>.startup, 0: no marker */
byte lock = 0;              /* 1 + the holder of the lock (election.pml checks the election) */
bool done[MAXGEN + 1];      /* a primary of generation g ran all TASKS steps in one run */
bool dead[NW];              /* killed, not yet respawned */
byte crashes = 0;

#ifdef NO_GENERATION_CHECK
#define marker_completed (marker != 0)
#else
#define marker_completed (marker == mygen)
#endif

proctype worker(byte me) {
  byte mygen, step;
  bool completed, threw, readable;
end_life:
  do
  :: atomic { mygen = gen; printf("W%d: spawned in generation %d\n", me, mygen) }
     {
end_loop:
       do
       :: atomic { lock == 0 -> lock = me + 1 }
          /* Coordinator::promote(): role_ = primary; read_startup_marker() */
          if
          :: atomic { completed = marker_completed; readable = true }   /* StartupBarrier::query() */
          :: atomic {                                /* query() failed (EIO, a refused file) */
               printf("W%d: marker unreadable: step down\n", me);
               lock = 0; readable = false            /* step_down_for_unreadable_marker() */
             }
          fi;
          if
          :: readable ->
             if
             :: !completed ->
#ifdef MARKER_FIRST
                atomic { marker = mygen; printf("W%d: marker := %d (before the tasks)\n", me, mygen) }
#endif
                /* on_startup: the tasks, from the first step */
                printf("W%d: on_startup begins (generation %d)\n", me, mygen);
                step = 0;
                do
                :: step < TASKS -> step++
                :: step < TASKS -> threw = true; break      /* on_startup throws */
                :: step == TASKS -> break
                od;
                if
                :: !threw ->
                   atomic { done[mygen] = true; printf("W%d: tasks of generation %d done\n", me, mygen) }
#ifndef MARKER_FIRST
                   skip;                                    /* write_marker(): the temporary file */
                   atomic {                                 /* rename(temporary, marker) */
                     marker = mygen; printf("W%d: marker := %d\n", me, mygen)
                   }
#endif
                :: else -> printf("W%d: on_startup threw\n", me)
                fi
             :: else -> printf("W%d: marker names generation %d: tasks skipped\n", me, mygen)
             fi;
             /* on_promoted: this worker serves as the primary */
             atomic {
               printf("W%d: on_promoted\n", me);
               assert(done[mygen] || threw);
               step = 0; threw = false; completed = false
             }
             /* ... the primary holds the lock until it dies or leaves (stop()) ... */
             atomic { lock = 0; readable = false }
          :: else -> skip
          fi
       :: /* wait_for_startup() on the host's thread (the Coordinator's thread stays a
             standby meanwhile): query() finds the marker naming this generation */
          atomic {
            lock != me + 1 && marker_completed ->
            printf("W%d: passes the barrier (generation %d)\n", me, mygen);
            assert(done[mygen])
          }
       od
     } unless {
       atomic { dead[me] -> printf("W%d: killed, respawned\n", me); step = 0; threw = false;
                completed = false; readable = false; dead[me] = false }
     }
  od
}

/* SIGKILL of one worker; the kernel frees its lock; the master respawns it (the worker's
   escape clause). */
active proctype crasher() {
  byte p;
end_crash:
  do
  :: atomic {
       crashes < MAXCRASH ->
       p = 0;
       do
       :: p < NW - 1 -> p++
       :: true -> break
       od;
       if
       :: !dead[p] ->
          if
          :: lock == p + 1 -> lock = 0
          :: else -> skip
          fi;
          dead[p] = true;
          crashes++
       :: else -> skip
       fi;
       p = 0
     }
  od
}

/* The server restarts: a new master (a new generation); all old workers die. */
active proctype restarter() {
  byte p;
end_restart:
  do
  :: atomic {
       gen < MAXGEN ->
       gen++;
       printf("restart: generation %d\n", gen);
       lock = 0;
       p = 0;
       do
       :: p < NW -> dead[p] = true; p++
       :: else -> break
       od;
       p = 0
     }
  od
}

init {
  byte k;
  atomic {
    k = 0;
    do
    :: k < NW -> run worker(k); k++
    :: else -> break
    od
  }
}
