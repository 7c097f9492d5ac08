/* tests/model/coordinator.pml: the Coordinator's standby and health check over a lock file
 * (FileBackend), with SIGKILL at any step and a file deleted or replaced under them.
 * Written from include/workerlock/coordinator.hpp and file_backend.hpp as they are; see
 * tests/model/README.md.
 *
 * Processes and steps (one system call or one atomic store = one step):
 *   worker(me) = one worker process with a Coordinator in thread mode:
 *     Coordinator::begin() then run(): while not held, FileBackend::wait_acquire() ->
 *       detail::acquire(block_interruptibly): open (or O_CREAT|O_EXCL), F_OFD_SETLKW,
 *       inspect_locked_file() (replaced: release, close, again), record write; then
 *       promote(): role_ = primary (on_promoted).
 *     While held: sleep_unless_stopped(verify_interval), verify() -> FileBackend::verify_held()
 *       (lstat(path) against s->dev/s->ino); on false demote_and_reset(): demote() runs
 *       on_demoted (role_ = secondary) THEN backend_->release(), then reset() closes the fd.
 *     Or stop() -> finish() -> demote("stopped"): on_demoted, then release; the worker starts
 *       a new Coordinator later (at most MAXSTOP stops in all).
 *   killer     = SIGKILL of any worker at any step (at most MAXKILL): the kernel drops its
 *                lock and descriptor, and the master respawns it (a new start()).
 *   outsider   = once: rm path, mv path elsewhere, or mv new path (replace).
 *
 * Properties:
 *   safety (assert in promoted): never two primaries by their own state (role_), except
 *     while the other's file was taken from under it by the outsider (`stolen`), the window
 *     the README states ("until its next health check").
 *   ltl live: ([] <> some worker is primary)  -- after the holder dies or stops, a standby is
 *             promoted --  and  [] (stolen0 -> <> !stolen0)  -- a primary whose file was
 *             deleted or replaced steps down (stated for worker 0; the workers are symmetric);
 *             under weak fairness (pan -a -f).
 * Bounds: NPROC workers (2: a primary and a standby; a killed worker is respawned as a new
 *   standby, so the standby changes), MAXKILL SIGKILLs (2), MAXSTOP stops (1), one
 *   outsider action; inode numbers are reused once free.
 *
 * Switches:
 *   -DRELEASE_BEFORE_DEMOTED  mutation: demote() releases the lock before on_demoted (and the
 *                             role change); spin must find two primaries.
 *   -DNO_HEALTH_CHECK         mutation (liveness): verify_held() always answers "held"; spin
 *                             must find a run where a primary whose file was deleted or
 *                             replaced never steps down (an acceptance cycle of ltl live).
 */

#ifndef NPROC
#define NPROC 2
#endif
#ifndef MAXKILL
#define MAXKILL 2
#endif
#ifndef MAXSTOP
#define MAXSTOP 1
#endif

#include "inodes.h"  /* inodes, the path, the locks, the outsider */

byte fdino[NPROC];      /* the worker's lock_state::fd (its inode), 0: closed */
bool owned[NPROC];      /* lock_state::owned: backend_->held() */
bool primary[NPROC];    /* Coordinator::role_ == Role::primary */
bool killed[NPROC];
byte kills = 0;
byte stops = 0;

#if NPROC == 2
#define someprimary (primary[0] || primary[1])
#else
#define someprimary (primary[0] || primary[1] || primary[2])
#endif
#define stolen0 (primary[0] && stolen[fdino[0]])
ltl live { ([] <> someprimary) && [] (stolen0 -> <> !stolen0) }

/* release(): F_UNLCK; reset()/close_file(): close(fd) */
inline release_and_close(p) {
  if
  :: fdino[p] != 0 ->
     if
     :: lockowner[fdino[p]] == p + 1 -> lockowner[fdino[p]] = 0
     :: else -> skip
     fi;
     drop_ref(fdino[p]);
     fdino[p] = 0
  :: else -> skip
  fi;
  owned[p] = false
}

/* Coordinator::promote(): role_.store(Role::primary); on_promoted */
inline promoted() {
  atomic {
    primary[me] = true;
    printf("W%d: promoted (inode %d)\n", me, fdino[me]);
    j = 0;
    do
    :: j < NPROC ->
       assert(j == me || !primary[j] || stolen[fdino[j]] || stolen[fdino[me]]);
       j++
    :: else -> break
    od;
    j = 0
  }
}

/* Coordinator::demote(): on_demoted (role_ = secondary), then backend_->release() */
inline demote() {
#ifndef RELEASE_BEFORE_DEMOTED
  atomic { primary[me] = false; printf("W%d: on_demoted\n", me) }
  atomic { lockowner[fdino[me]] = 0; owned[me] = false; printf("W%d: release\n", me) }
#else
  atomic { lockowner[fdino[me]] = 0; owned[me] = false; printf("W%d: release\n", me) }
  atomic { primary[me] = false; printf("W%d: on_demoted\n", me) }
#endif
}

proctype worker(byte me) {
  byte i, j;
end_life:
  do
  :: {
       do
       :: !owned[me] ->
          /* FileBackend::wait_acquire() -> detail::acquire(s, block_interruptibly, f) */
          if
          :: fdino[me] == 0 ->          /* open_registered() */
             do
             :: atomic { path != 0 -> fdino[me] = path; refs[path]++; break }
             :: atomic {
                  path == 0 -> alloc(i); path = i; refs[i] = 2; fdino[me] = i; i = 0;
                  printf("W%d: created inode %d\n", me, path); break
                }
             od
          :: else -> skip
          fi;
end_wait:
          atomic { lockowner[fdino[me]] == 0 -> lockowner[fdino[me]] = me + 1; owned[me] = true }
          if
          :: atomic { path == fdino[me] -> skip }        /* inspect_locked_file(): ours */
             promoted()                                  /* (record written) promote() */
          :: atomic { path != fdino[me] -> release_and_close(me) }  /* replaced: again */
          fi
       :: owned[me] ->
          if
          :: /* health check: verify() -> FileBackend::verify_held() */
             if
             :: atomic { path == fdino[me] -> skip }     /* still ours */
#ifndef NO_HEALTH_CHECK
             :: atomic { path != fdino[me] -> printf("W%d: health check: file gone\n", me) }
#else
             :: atomic { path != fdino[me] -> skip }     /* mutation: verify_held() says yes */
             :: false ->
#endif
                demote();                                /* demote_and_reset() */
                atomic { release_and_close(me) }         /*   backend_->reset() */
             fi
          :: atomic { stops < MAXSTOP -> stops++; printf("W%d: stop()\n", me) }
             demote();                                   /* finish() -> demote("stopped") */
             atomic { release_and_close(me) }            /* ~Coordinator: the fd closes */
          fi
       od
     } unless {
       atomic { killed[me] -> killed[me] = false; i = 0; j = 0;
                printf("W%d: respawned\n", me) }
     }
  od
}

/* SIGKILL: the kernel drops the lock and the descriptor; the master respawns the worker. */
active proctype killer() {
  byte p;
end_kill:
  do
  :: atomic {
       kills < MAXKILL ->
       p = 0;
       do
       :: p < NPROC - 1 -> p++
       :: true -> break
       od;
       if
       :: !killed[p] ->
          printf("killer: SIGKILL W%d\n", p);
          release_and_close(p);
          primary[p] = false;
          killed[p] = true;
          kills++
       :: else -> skip
       fi;
       p = 0
     }
  od
}

init {
  byte k;
  atomic {
    k = 0;
    do
    :: k < NPROC -> run worker(k); k++
    :: else -> break
    od
  }
}
