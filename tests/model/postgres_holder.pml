/* tests/model/postgres_holder.pml: the PostgreSQL two-session holder (PostgresBackend under
 * the Coordinator) in discrete time: sessions killed one at a time or both, the server
 * restarting, the restart grace.  Written from include/workerlock/postgres.hpp (the class
 * comment "Two locks, two sessions", acquire(), advance(), verify_held(), release()) and
 * coordinator.hpp (run(), promote(), demote()) as they are; see tests/model/README.md.
 *
 * Time: one tick = one unit; every clock is exact (no drift here: see redis_lease.pml).
 *   V = verify_interval = 2, C = command_timeout = 1, G = restart_grace = V + C (its default).
 * Processes and steps:
 *   worker(p) = a worker with a Coordinator over a PostgresBackend; session 0 = the lock
 *     session, session 1 = the fence session.
 *     standby: wait_acquire() -> acquire(true) -> advance(): connect both sessions
 *       (standby_fence_session); pg_advisory_lock(key) on session 0 (the election lock L);
 *       pg_advisory_lock(hi, lo) on session 1 (the handover lock F), whose row also gives the
 *       server's uptime; not_before = max(grace_floor, now + G - uptime); wait until then;
 *       then advance()'s re-check: prove(), SELECT pg_backend_pid() on both sessions, which
 *       succeeds only if both are the sessions that took the locks (so the lock session still
 *       holds the election lock); held -> promote().  A session ended by the server fails the
 *       wait or the re-check (ECONNRESET): reset() (the handover lock is freed),
 *       grace_floor = now + G, and again.
 *     holder: sleep verify_interval (V) after the last check; verify_held(): SELECT
 *       pg_backend_pid() on both sessions, answered by the server at some time within C (or
 *       not: a timeout), the answer telling whether both sessions are the ones that took the
 *       locks; false -> demote(): on_demoted, then release() (pg_advisory_unlock on both;
 *       a dead session is closed).  The holder is never paused here: the window below is a
 *       bound on time, so its checks run on schedule (the clock waits for them).
 *   killer     = pg_terminate_backend of one session of any worker, holder or standby (at
 *                most MAXKILL), which frees that session's lock at once.
 *   restarter  = the server restarts once: every session ends, every lock is freed.
 *   clock      = real time advances one tick, when no holder's check is due.
 *
 * Properties (asserts):
 *   promote():  a new primary overlaps an old one only if BOTH of the old one's sessions were
 *               ended while it held (not by a restart: the grace covers that) -- the case the
 *               README and the class comment leave uncovered;
 *   clock:      and then for at most V + C after the second one ended (the stated window).
 * Bounds: NP = 2 workers, TMAX = 9 ticks, MAXKILL = 2 session kills, one restart.
 *
 * Switches:
 *   -DNO_HANDOVER_LOCK  mutation: a new holder needs only the election lock (no fence
 *                       session's lock); spin finds an overlap after ONE session was killed.
 *   -DNO_RESTART_GRACE  mutation: no restart grace; spin finds an overlap after a restart.
 *   -DNO_OVERLAP        the window is real: assert that two primaries never overlap at all;
 *                       spin finds the both-sessions-killed overlap (documented counterexample).
 *   -DNO_LOCK_SESSION_RECHECK  mutation: no re-check after the handover lock (advance() as it
 *                       was: the lock session is not asked again after locked_[0] was set).
 *                       Spin finds an overlap without both of one holder's sessions ended: a
 *                       standby takes the election lock, loses its lock session, the holder
 *                       loses its fence session, and the standby then takes the handover lock
 *                       and is promoted while the holder still is primary.
 */

#define NP 2
#ifndef TMAX
#define TMAX 9
#endif
#define V 2
#define C 1

#ifdef NO_RESTART_GRACE
#define G 0
#else
#define G 3
#endif
#ifndef MAXKILL
#define MAXKILL 2
#endif
#define NEVER 255

byte t = 0;
byte L = 0;                 /* 1 + the worker whose lock session holds the election lock */
byte F = 0;                 /* 1 + the worker whose fence session holds the handover lock */
bool restarted = false;
byte restart_time = 0;      /* when the server (re)started, if restarted */
byte kills = 0;

bool alive0[NP];            /* the worker's lock session is open at the server */
bool alive1[NP];            /* the worker's fence session is open at the server */
bool primary[NP];           /* Coordinator::role_ */
byte due[NP];               /* by this time the worker must act: start or end a check, or
                               promote once its grace is over (nobody is paused here) */
bool pending[NP];           /* a check sent, not yet answered */
/* A check on a session the server ended fails at once (the connection is reset). */
#define reset_seen(p) (pending[p] && (!alive0[p] || !alive1[p]))
bool holding[NP];           /* it holds both locks (from the handover lock on) */
bool bothkilled[NP];        /* both its sessions were ended (not by a restart) while holding */
byte overlap_since = 0;     /* when the current overlap of two primaries began */

/* pg_terminate_backend of one session; or a server restart (all of them). */
#define killable(p) true          /* any session: a holder's or a standby's */
active proctype killer() {
  byte p;
end_kill:
  do
  :: atomic {
       kills < MAXKILL ->
       p = 0;
       do
       :: p < NP - 1 -> p++
       :: true -> break
       od;
       if
       :: killable(p) && alive0[p] -> alive0[p] = false; kills++;
          if :: L == p + 1 -> L = 0 :: else -> skip fi;
          printf("kill: W%d's lock session at %d\n", p, t)
       :: killable(p) && alive1[p] -> alive1[p] = false; kills++;
          if :: F == p + 1 -> F = 0 :: else -> skip fi;
          printf("kill: W%d's fence session at %d\n", p, t)
       :: else -> skip
       fi;
       if
       :: holding[p] && !alive0[p] && !alive1[p] -> bothkilled[p] = true
       :: else -> skip
       fi;
       p = 0
     }
  :: atomic {
       !restarted ->
       restarted = true; restart_time = t; L = 0; F = 0;
       p = 0;
       do
       :: p < NP -> alive0[p] = false; alive1[p] = false; p++
       :: else -> break
       od;
       p = 0;
       printf("restart: the server restarts at %d\n", t)
     }
  od
}

active proctype clock() {
  byte p;
end_clock:
  do
  :: atomic {
       t < TMAX && t < due[0] && t < due[1] && !reset_seen(0) && !reset_seen(1) ->
       t++;
       p = 0;
       do
       :: p < NP - 1 -> p++
       :: else -> break
       od;
       p = 0;
       assert(!(primary[0] && primary[1]) || t - overlap_since <= V + C)
     }
  od
}

inline promote() {
  primary[me] = true;
  printf("W%d: promoted at %d\n", me, t);
  o = 0;
  do
  :: o < NP ->
     if
     :: o != me && primary[o] ->
        overlap_since = t;
#ifdef NO_OVERLAP
        assert(false);
#else
        assert(bothkilled[o] || bothkilled[me]);
#endif
     :: else -> skip
     fi;
     o++
  :: else -> break
  od;
  o = 0
}

/* reset(): both connections closed (the server frees whatever they held). */
inline reset() {
  if :: L == me + 1 && alive0[me] -> L = 0 :: else -> skip fi;
  if :: F == me + 1 && alive1[me] -> F = 0 :: else -> skip fi;
  alive0[me] = false; alive1[me] = false; holding[me] = false; bothkilled[me] = false
}

/* advance()'s re-check after the handover lock, before held_ = true: prove(), one round trip
   on both sessions, answered only if both are the sessions that took the locks. */
#ifdef NO_LOCK_SESSION_RECHECK
#define rechecked(p) true
#else
#define rechecked(p) (alive0[p] && alive1[p])
#endif

/* Coordinator::demote(): on_demoted, then release() (unlock both; a dead session closed). */
inline demote() {
  primary[me] = false; due[me] = NEVER;
  printf("W%d: on_demoted at %d; release\n", me, t);
  reset()
}

proctype worker(byte me) {
  byte o, not_before, grace_floor, vdeadline;
end_worker:
  do
  :: !primary[me] ->
     /* PostgresBackend::acquire(true) -> advance() */
     atomic { alive0[me] = true; alive1[me] = true }     /* connect both sessions */
end_lock:
     if
     :: atomic { L == 0 && alive0[me] -> L = me + 1;      /* pg_advisory_lock(key) */
                 printf("W%d: takes the election lock at %d\n", me, t) }
#ifndef NO_HANDOVER_LOCK
end_fence:
        if
        :: atomic {
             F == 0 && alive1[me] -> F = me + 1;            /* pg_advisory_lock(hi, lo) */
             holding[me] = true;
             printf("W%d: takes the handover lock at %d\n", me, t);
             if :: restarted && t - restart_time < G -> not_before = restart_time + G
                :: else -> not_before = t
             fi;
             if :: grace_floor > not_before -> not_before = grace_floor :: else -> skip fi;
             due[me] = not_before
           }
        :: atomic {                                        /* the session ended: ECONNRESET */
             !alive0[me] || !alive1[me] -> reset(); grace_floor = t + G; not_before = NEVER
           }
        fi;
#else
        atomic {
          not_before = t; holding[me] = true;
          if :: restarted && t - restart_time < G -> not_before = restart_time + G
             :: else -> skip
          fi;
          if :: grace_floor > not_before -> not_before = grace_floor :: else -> skip fi;
          due[me] = not_before
        };
#endif
        if
        :: not_before != NEVER ->
end_grace:
           if
           :: atomic {                                     /* wait out the restart grace */
                t >= not_before &&
                /* within one tick, the checks of a primary due now come first: they stand for
                   instants before it (they were scheduled by events before the grace began) */
                !(primary[1 - me] && (due[1 - me] <= t || reset_seen(1 - me))) &&
                rechecked(me) ->
                not_before = 0;
                promote();                                 /* held_ = true; promote() */
                due[me] = t + V
              }
#ifndef NO_LOCK_SESSION_RECHECK
           :: atomic {                 /* advance(): prove() fails at once: ECONNRESET */
                t >= not_before && (!alive0[me] || !alive1[me]) ->
                printf("W%d: the re-check after the handover lock fails at %d\n", me, t);
                not_before = 0; reset(); grace_floor = t + G
              }
#endif
           fi
        :: else -> not_before = 0
        fi
     :: atomic {                                           /* the session ended: ECONNRESET */
          !alive0[me] || !alive1[me] -> reset(); grace_floor = t + G
        }
     fi
  :: primary[me] ->
     /* Coordinator::run(): sleep verify_interval(), then verify_held() */
end_sleep:
     atomic { t >= due[me] -> pending[me] = true; vdeadline = t + C; due[me] = vdeadline }
end_answer:
     if
     :: atomic {            /* the server answers: both sessions are the ones holding the locks */
          pending[me] && alive0[me] && alive1[me] -> pending[me] = false
        }
end_reply:
        atomic { due[me] = t + V; vdeadline = 0 }         /* the answer arrives (within C) */
     :: atomic {            /* a session was ended: the check fails at once (connection reset) */
          pending[me] && (!alive0[me] || !alive1[me]) -> pending[me] = false; vdeadline = 0;
          demote()
        }
     :: atomic {            /* no answer within command_timeout */
          pending[me] && t >= vdeadline -> pending[me] = false; vdeadline = 0; demote()
        }
     fi
  od
}

init {
  atomic {
    due[0] = NEVER; due[1] = NEVER;
    run worker(0); run worker(1)
  }
}
