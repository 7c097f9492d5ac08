/* tests/model/coordinator.pml: the Coordinator's standby and health check over a lock file
 * (FileBackend), with SIGKILL at any step and a file deleted or replaced under them, and
 * the whole-server stop (StopScope::whole_server: the note, the deferral, the check after it).
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
 *     Or stop(scope) -> finish() -> demote(reason, note): on_demoted, then (scope
 *       StopScope::whole_server only) FileBackend::note_server_stopping() writes the note
 *       <path>.stopped, then release; the worker starts a new Coordinator later (at most
 *       MAXSTOP stops in all, each of either scope).
 *     The whole-server deferral, in promote() after a hold is won:
 *       server_stop_deferral() (FileBackend::server_stop_noted() + server_stop_grace) is
 *         still ahead: role_ stays secondary, no callback, and the thread waits in
 *         sleep_until_unless_stopped(until) (`deferring`, `until`);
 *       the grace passes (the `grace` process): still_held_after_deferral() -> verify() ->
 *         FileBackend::verify_held(); true: take_role() (= promoted()); false: release(),
 *         reset(), no callback, and the loop acquires anew;
 *       or stop() during the wait: promote() returns and finish() takes its branch for a
 *         hold never promoted (finish_unpromoted): no callback; a whole_server stop writes
 *         the note only if server_stop_deferral() has passed (no current note: no
 *         chaining); release.  The same branch runs for a stop that came just as
 *         wait_acquire() won the hold (run(): stop_requested_ after wait_acquire()).
 *   grace      = time, abstracted: the notes are numbered (note = the newest, 0: none) and
 *                the grace of each passes once, in order, at any moment (passed = the newest
 *                note whose grace has passed); a note is current while passed < note.
 *   killer     = SIGKILL of any worker at any step (at most MAXKILL): the kernel drops its
 *                lock and descriptor, and the master respawns it (a new start()).
 *   outsider   = once: rm path, mv path elsewhere, or mv new path (replace).
 *
 * Properties:
 *   safety (assert in promoted): never two primaries by their own state (role_), except
 *     while the other's file was taken from under it by the outsider (`stolen`), the window
 *     the README states ("until its next health check").
 *   safety (assert in promoted_after_deferral): a worker that deferred never takes the role (on_promoted)
 *     on a file that the path no longer named when its grace passed (`stale`).
 *   ltl live: ([] <> some worker is primary)  -- after the holder dies or stops, a standby is
 *             promoted --  and  [] (stolen0 -> <> !stolen0)  -- a primary whose file was
 *             deleted or replaced steps down (stated for worker 0; the workers are symmetric);
 *             under weak fairness (pan -a -f).
 * Bounds: NPROC workers (2: a primary and a standby; a killed worker is respawned as a new
 *   standby, so the standby changes), MAXKILL SIGKILLs (2), MAXSTOP stops (2, each
 *   worker or whole_server scope, so a whole-server stop and a stop during the deferral
 *   it causes), one outsider action (also during a deferral); inode numbers are reused
 *   once free; at most MAXSTOP notes.
 *
 * Switches:
 *   -DRELEASE_BEFORE_DEMOTED  mutation: demote() releases the lock before on_demoted (and the
 *                             role change); spin must find two primaries.
 *   -DNO_HEALTH_CHECK         mutation (liveness): verify_held() always answers "held"; spin
 *                             must find a run where a primary whose file was deleted or
 *                             replaced never steps down (an acceptance cycle of ltl live).
 *   -DNO_VERIFY_AFTER_DEFERRAL mutation: promote() takes the role right after the grace,
 *                             without still_held_after_deferral(); spin must find a
 *                             deferred worker promoted on a file the outsider replaced or
 *                             removed before its grace passed (the `stale` assertion;
 *                             checked as a breadth-first safety search, for a short trail).
 */

#ifndef NPROC
#define NPROC 2
#endif
#ifndef MAXKILL
#define MAXKILL 2
#endif
#ifndef MAXSTOP
#define MAXSTOP 2
#endif

#include "inodes.h"  /* inodes, the path, the locks, the outsider */

byte fdino[NPROC];      /* the worker's lock_state::fd (its inode), 0: closed */
bool owned[NPROC];      /* lock_state::owned: backend_->held() */
bool primary[NPROC];    /* Coordinator::role_ == Role::primary */
bool killed[NPROC];
byte kills = 0;
byte stops = 0;
byte note = 0;          /* <path>.stopped: the number of the newest note, 0: none */
byte passed = 0;        /* the newest note whose server_stop_grace has passed */
bool deferring[NPROC];  /* holds the lock, in promote()'s wait for the grace to pass */
byte until[NPROC];      /* the note the deferral waits on (server_stop_deferral()) */
bool stale[NPROC];      /* ghost: the path no longer named its file when its grace passed */

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

/* stop(scope): StopScope::worker or StopScope::whole_server (whole_server_stop_) */
inline stop_scope(ws) {
  if
  :: ws = true; printf("W%d: stop(whole_server)\n", me)
  :: ws = false; printf("W%d: stop(worker)\n", me)
  fi
}

/* finish() for a hold never promoted (deferred, or won just as the stop came): no
 * callback; a whole_server stop writes the note only when server_stop_deferral() has passed
 * (there is no current note: a deferred worker keeps the note it deferred on); release. */
inline finish_unpromoted() {
  if
  :: atomic { ws && passed == note -> note++;
              printf("W%d: note (whole-server stop %d)\n", me, note) }
  :: else -> skip
  fi;
  atomic { deferring[me] = false; until[me] = 0; ws = false;
           release_and_close(me) }               /* release; ~Coordinator: the fd closes */
}

/* take_role() after a deferral: role_ = primary, on_promoted */
inline promoted_after_deferral() {
  atomic { assert(!stale[me]); stale[me] = false }
  promoted()
}

/* FileBackend::note_server_stopping(): writes <path>.stopped, dated now */
inline write_note() {
  atomic { note++; printf("W%d: note (whole-server stop %d)\n", me, note) }
}

/* Coordinator::demote(reason, note): on_demoted (role_ = secondary), with a whole-server
 * stop note_server_stopping(), then backend_->release() */
inline demote(ws) {
#ifndef RELEASE_BEFORE_DEMOTED
  atomic { primary[me] = false; printf("W%d: on_demoted\n", me) }
  if
  :: ws -> write_note()
  :: else -> skip
  fi;
  atomic { lockowner[fdino[me]] = 0; owned[me] = false; printf("W%d: release\n", me) }
#else
  if
  :: ws -> write_note()
  :: else -> skip
  fi;
  atomic { lockowner[fdino[me]] = 0; owned[me] = false; printf("W%d: release\n", me) }
  atomic { primary[me] = false; printf("W%d: on_demoted\n", me) }
#endif
}

proctype worker(byte me) {
  byte i, j;
  bool ws;  /* the stop asked is StopScope::whole_server */
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
             /* (record written) promote(): server_stop_deferral() */
             if
             :: atomic { passed == note -> skip }        /* no current note */
                promoted()                               /* take_role() */
             :: atomic { passed != note -> deferring[me] = true; until[me] = note;
                         printf("W%d: holds inode %d, defers (note %d)\n", me, fdino[me], note) }
                /* sleep_until_unless_stopped(until) */
                if
                :: atomic { passed >= until[me] -> stale[me] = (path != fdino[me]);
                            deferring[me] = false; until[me] = 0;
                            printf("W%d: grace passed\n", me) }
#ifndef NO_VERIFY_AFTER_DEFERRAL
                   /* still_held_after_deferral(): verify() -> verify_held() */
                   if
                   :: atomic { path == fdino[me] -> skip }
                      promoted_after_deferral()          /* take_role() */
                   :: atomic { path != fdino[me] -> stale[me] = false;
                               printf("W%d: lost during the deferral\n", me);
                               release_and_close(me) }   /* release(), reset(): no callback */
                   fi
#else
                   promoted_after_deferral()             /* mutation: take_role() at once */
#endif
                :: atomic { stops < MAXSTOP -> stops++;        /* stop(scope) */
                            if
                            :: ws = true; printf("W%d: stop(whole_server) during the deferral\n", me)
                            :: ws = false; printf("W%d: stop(worker) during the deferral\n", me)
                            fi }
                   finish_unpromoted()
                fi
             :: atomic { stops < MAXSTOP -> stops++;           /* stop(scope) */
                         if
                         :: ws = true; printf("W%d: stop(whole_server) as the hold was won\n", me)
                         :: ws = false; printf("W%d: stop(worker) as the hold was won\n", me)
                         fi }
                finish_unpromoted()                      /* run(): stop_requested_: finish() */
             fi
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
                demote(false);                           /* demote_and_reset() */
                atomic { release_and_close(me) }         /*   backend_->reset() */
             fi
          :: atomic { stops < MAXSTOP -> stops++; stop_scope(ws) }
             demote(ws);                                 /* finish() -> demote(.., note) */
             atomic { ws = false; release_and_close(me) }  /* ~Coordinator: the fd closes */
          fi
       od
     } unless {
       atomic { killed[me] -> killed[me] = false; i = 0; j = 0; ws = false;
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
          deferring[p] = false; until[p] = 0; stale[p] = false;
          killed[p] = true;
          kills++
       :: else -> skip
       fi;
       p = 0
     }
  od
}

/* Time: the server_stop_grace of each note passes, in order, at some moment. */
active proctype grace() {
end_grace:
  do
  :: atomic { passed < note -> passed++; printf("grace of note %d passed\n", passed) }
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
