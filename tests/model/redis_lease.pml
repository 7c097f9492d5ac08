/* tests/model/redis_lease.pml: the Redis lease (RedisBackend under the Coordinator) in
 * discrete time, with drifting clocks, paused processes and lost messages.  Written from
 * include/workerlock/redis.hpp ("SELF-DEMOTION: THE ARITHMETIC", the acquire/renew/release
 * scripts, try_acquire(), verify_held(), verify_interval(), release()) and coordinator.hpp
 * (run(), promote(), demote()) as they are; see tests/model/README.md.
 *
 * Time: one tick = one unit of every duration below.  `t` is real time, which is also the
 * Redis server's clock (the reference).  Each client has its own monotonic clock lc[c]; it
 * may fall behind real
 * time by up to MAXDRIFT ticks over the run, so also within any lease window, which is all a
 * lease's validity depends on (a slow client clock, or a fast server clock: the dangerous
 * direction; a fast client clock only ends the lease earlier).  The code assumes that
 * D = drift_margin covers that drift.
 *
 * Processes and steps:
 *   client(c) = a worker with a Coordinator over a RedisBackend:
 *     standby: try_acquire()/wait_acquire() -> attempt(): sends the acquire script (SET key
 *       token NX PX ttl; INCR <key>:fence) at local time s, waits for the reply until
 *       s + C (command_timeout); on a fencing token: held, valid_until = s + T - D, then
 *       promote(); otherwise it tries again after poll_interval (one tick here) or later.
 *     holder: sleeps verify_interval(): V after the last renewal, shortened to
 *       valid_until - C - now (or longer: a pause); then verify_held(): throws if now >= valid_until, else sends the renew script
 *       (compare-then-PEXPIRE) at s2 with the deadline min(s2 + C, valid_until); reply 1:
 *       valid_until = s2 + T - D; reply 0 (lost the key), a timeout or a throw: demote():
 *       on_demoted, then release() (compare-then-DEL, not waited for: it may be lost).
 *     act: whenever role() says primary (held and now < valid_until(): the Coordinator reads
 *       Backend::valid_until(), an assumption this model makes explicit), the worker may act as
 *       the primary, with its fencing token.
 *     Any client may be paused at any point for any time: time advances without it.
 *   server    = Redis: runs a request at any time after it was sent (or never: a lost
 *               request), its reply may be lost; the key expires T ticks after a SET/PEXPIRE.
 *               A request the client gave up on may still run later, until its next request.
 *   clock     = real time advances one tick; each client clock advances, or falls behind.
 *
 * Properties (asserts):
 *   act:          a holder never acts as primary after its lease's local deadline.
 *   lease_valid:  two holders never both have a valid local lease (checked whenever a lease
 *                 becomes valid: that is the only step that can break it).
 *   fencing:      fencing tokens strictly increase, hold after hold.
 * Bounds: NC = 2 clients, TMAX = 8 ticks of real time (a lease and most of the next),
 *   T = 5, D = 1, MAXDRIFT = 1, V = 2, C = 2 (V + C <= T - D, as prepare() requires).
 *
 * Switches:
 *   -DDRIFT_MARGIN=0      documented counterexample: the same model with no drift margin; spin
 *                         finds two holders with a valid local lease.
 *   -DROLE_IGNORES_LEASE  mutation: role() is primary from promote() to demote() whatever
 *                         valid_until() says; spin finds a paused holder acting after its
 *                         lease's deadline.
 */

#define NC 2
#ifndef TMAX
#define TMAX 8
#endif
#define TTL 5
#ifndef DRIFT_MARGIN
#define DRIFT_MARGIN 1
#endif
#define MAXDRIFT 1
#define CMD 2
#define VERIFY 2

#define NONE 0
#define ACQUIRE 1
#define RENEW 2
#define RELEASE 3

byte t = 0;                 /* real time = the Redis server's clock */
byte key = 0;               /* the token in the key (1 + client), 0: no key */
byte key_exp = 0;           /* real time at which the key expires */
byte fence = 0;             /* <key>:fence */
byte last_fence = 0;        /* the highest fencing token handed out to a holder so far */

byte lc[NC];                /* each client's monotonic clock */
byte lag[NC];               /* how far it fell behind real time (at most MAXDRIFT) */
bool held[NC];              /* RedisBackend::held_ */
byte vu[NC];                /* valid_until(), on the client's clock */

byte req[NC];               /* the request not yet run by Redis (NONE: none, or it ran) */
byte reply[NC];             /* its reply as received: 0 none (yet, or lost), else 1 + answer */

#define key_live (key != 0 && t < key_exp)
#define valid(c) (held[c] && lc[c] < vu[c])
/* Coordinator::role_ is primary from promote() to demote(), exactly while held[c] here */
#ifdef ROLE_IGNORES_LEASE
#define role(c) (held[c])
#else
#define role(c) (held[c] && valid(c))
#endif

/* Redis: runs one request (the scripts are atomic), and maybe loses the reply. */
active proctype server() {
  byte c, answer;
end_server:
  do
  :: atomic {
       c = 0;
       do
       :: c < NC - 1 -> c++
       :: true -> break
       od;
       if
       :: req[c] != NONE ->
          answer = 0;
          if
          :: req[c] == ACQUIRE ->              /* SET key token NX PX ttl; INCR fence */
             if
             :: !key_live || key == c + 1 -> key = c + 1; key_exp = t + TTL; fence++; answer = fence;
                printf("redis: C%d's acquire runs at real time %d: key until %d\n", c, t, key_exp)
             :: else -> skip
             fi
          :: req[c] == RENEW ->                /* compare-then-PEXPIRE */
             if
             :: key_live && key == c + 1 -> key_exp = t + TTL; answer = 1;
                printf("redis: C%d's renewal runs at real time %d: key until %d\n", c, t, key_exp)
             :: else -> skip
             fi
          :: req[c] == RELEASE ->              /* compare-then-DEL */
             if
             :: key_live && key == c + 1 -> key = 0
             :: else -> skip
             fi
          fi;
          /* The reply arrives (a lost or late reply: the client reads it too late, or never,
             which its pauses already cover). */
          if
          :: req[c] != RELEASE -> reply[c] = answer + 1
          :: else -> skip
          fi;
          req[c] = NONE
       :: else -> skip
       fi;
       c = 0; answer = 0
     }
  od
}

/* Real time advances; each client clock advances, or falls behind by up to MAXDRIFT. */
active proctype clock() {
  byte c;
end_clock:
  do
  :: atomic {
       t < TMAX ->
       t++;
       c = 0;
       do
       :: c < NC ->
          if
          :: lc[c] = lc[c] + 1
          :: lag[c] < MAXDRIFT -> lag[c]++;
             printf("clock: real time %d, C%d's clock stays at %d (falls behind)\n", t, c, lc[c])
          fi;
          c++
       :: else -> break
       od;
       c = 0
     }
  od
}

/* Every other client's lease must be invalid when ours becomes valid. */
inline lease_became_valid() {
  o = 0;
  do
  :: o < NC -> assert(o == me || !valid(o)); o++
  :: else -> break
  od;
  o = 0
}

inline send(op) {
  req[me] = op; reply[me] = 0; s = lc[me]
}

/* Coordinator::demote(): on_demoted (role_ = secondary), then RedisBackend::release(), whose
   compare-then-DEL is sent but not waited for here (it may be lost, or overtaken). */
inline demote() {
  held[me] = false; vu[me] = 0;
  printf("C%d: on_demoted, release at local %d\n", me, lc[me]);
  send(RELEASE); s = 0; deadline = 0; next = 0
}

proctype client(byte me) {
  byte s, deadline, next, o;
end_client:
  do
  :: atomic {   /* RedisBackend::attempt() (after poll_interval): the acquire script */
       !held[me] && lc[me] >= next -> send(ACQUIRE); deadline = s + CMD; next = 0
     }
end_acquiring:
     if
     :: atomic {
          reply[me] > 1 && lc[me] < deadline ->     /* a fencing token: we hold the key */
          held[me] = true; vu[me] = s + TTL - DRIFT_MARGIN;
          printf("C%d: holds at real time %d, local %d: token %d, valid until local %d (sent at %d)\n",
                 me, t, lc[me], reply[me] - 1, vu[me], s);
          assert(reply[me] - 1 > last_fence);        /* fencing tokens strictly increase */
          last_fence = reply[me] - 1;
          lease_became_valid();                      /* then Coordinator::promote() */
          next = s + VERIFY; s = 0; deadline = 0; reply[me] = 0
        }
     :: atomic {                                     /* held by another: poll_interval */
          reply[me] == 1 && lc[me] < deadline -> next = lc[me] + 1; s = 0; deadline = 0;
          reply[me] = 0
        }
     :: atomic { lc[me] >= deadline -> s = 0; deadline = 0 }  /* timed out (it may run later) */
     fi
  :: /* act as the primary whenever role() says so */
     atomic {
       held[me] && role(me) ->
       printf("C%d: acts as primary at local %d (valid until %d)\n", me, lc[me], vu[me]);
       assert(lc[me] < vu[me])
     }
  :: /* Coordinator::run(): sleep verify_interval(), then verify() -> verify_held() */
     atomic {
       held[me] && (lc[me] >= next || lc[me] + CMD >= vu[me]) ->
       if
       :: lc[me] >= vu[me] -> demote()              /* the lease ran out: throws */
       :: else -> send(RENEW); deadline = (s + CMD < vu[me] -> s + CMD : vu[me])
       fi
     }
     if
     :: !held[me] -> skip
     :: else ->
end_renewing:
        if
        :: atomic {
             reply[me] == 2 && lc[me] < deadline ->  /* renewed */
             vu[me] = s + TTL - DRIFT_MARGIN; next = s + VERIFY;
             printf("C%d: renewed at %d, valid until local %d\n", me, s, vu[me]);
             lease_became_valid();
             s = 0; deadline = 0; reply[me] = 0
           }
        :: atomic { reply[me] == 1 && lc[me] < deadline -> demote() }  /* the key is not ours */
        :: atomic { lc[me] >= deadline -> demote() }                   /* timed out */
        fi
     fi
  od
}

init {
  atomic { run client(0); run client(1) }
}
