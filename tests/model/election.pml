/* tests/model/election.pml: the lock-file election (WorkerLock), model-checked by spin.
 * Written from include/workerlock/detail/lock_file.hpp as it is; see tests/model/README.md.
 *
 * What runs (each statement below is one system call, one atomic step):
 *   worker(me)  = a process calling WorkerLock::lock() (detail::acquire(s, wait_mode::block))
 *                 then unlock() (detail::release) or unlock_and_remove()
 *                 (detail::release_and_remove), in a loop for ever.  unlock() keeps the
 *                 descriptor, so the next lock() locks the same inode again, which may have
 *                 lost its name meanwhile: the same case as a fresh open() that raced.
 *   outsider    = someone else, once: `rm path`, `mv path elsewhere`, or `mv new path`.
 *
 * Kernel state modelled (inodes.h, shared with coordinator.pml): inodes (refs = names + open
 * descriptors; an inode with neither is freed and its number reused), the binding of the path
 * to an inode, one OFD/flock lock per inode (lockowner).  Open descriptors keep their inode
 * after unlink or rename.
 *
 * Property (assert in became_holder): never two processes that both believe they hold the
 * lock on the path, unless the other one's file was taken from under it (`stolen`: its name
 * removed by the outsider, or by a remover that no longer held that file; the Coordinator's
 * health check, model coordinator.pml, is what ends such a hold).  A process believes it holds
 * from the moment detail::acquire() returns true until it calls unlock() or
 * unlock_and_remove().
 *
 * Bounds: NPROC workers (3: the unlink race needs a holder, a waiter and a newcomer), one
 * outsider action, NINO-1 inode numbers (enough: asserted in alloc).  The workers loop for
 * ever, so the search covers every number of acquisitions.
 *
 * Switches:
 *   -DNO_PATH_CHECK  mutation: acquire() trusts the grant without inspect_locked_file()
 *                    (the path check after the lock); spin must find two holders.
 *   -DSTRICT_REMOVER documented finding: count a file unlinked by a remover whose lstat()
 *                    check went stale as NOT stolen; spin then finds the window between
 *                    release_and_remove()'s lstat() and unlink(), which the outsider opens.
 */

#ifndef NPROC
#define NPROC 3
#endif

#include "inodes.h"  /* inodes, the path, the locks, the outsider */

byte fdino[NPROC];      /* lock_state::fd: the inode of the worker's descriptor, 0: closed */
bool holds[NPROC];      /* the worker believes it holds the lock */

/* The other believers must all have lost their file (see the header). */
inline became_holder() {
  atomic {
    holds[me] = true;
    printf("W%d: HOLDS the lock (inode %d)\n", me, fdino[me]);
    j = 0;
    do
    :: j < NPROC ->
       assert(j == me || !holds[j] || stolen[fdino[j]] || stolen[fdino[me]]);
       j++
    :: else -> break
    od;
    j = 0
  }
}

proctype worker(byte me) {
  byte i, j;
end_idle:
  do
  :: true ->
acquire:  /* detail::acquire(s, wait_mode::block, f) */
    if
    :: fdino[me] == 0 ->
       /* detail::open_registered: open(path, O_RDWR|O_CLOEXEC|O_NOFOLLOW), and on ENOENT
          open(path, ... | O_CREAT | O_EXCL), retried while EEXIST */
       do
       :: atomic { path != 0 -> fdino[me] = path; refs[path]++;
                   printf("W%d: open(path) -> inode %d\n", me, path); break }
       :: atomic { path == 0 -> skip };                       /* open: ENOENT */
          atomic {
            if
            :: path == 0 -> alloc(i); path = i; refs[i] = 2; fdino[me] = i; i = 0; /* created */
               printf("W%d: open(path, O_CREAT|O_EXCL) -> new inode %d\n", me, path);
               break
            :: else -> skip                                     /* EEXIST: again */
            fi
          }
       od
    :: else -> skip /* s.fd >= 0: the descriptor kept from an earlier hold is reused */
    fi;
    /* acquire_once(s.fd, mechanism, true): F_OFD_SETLKW / flock(LOCK_EX), s.owned = true */
end_wait:
    atomic { lockowner[fdino[me]] == 0 -> lockowner[fdino[me]] = me + 1;
             printf("W%d: lock granted on inode %d (the path names inode %d)\n", me, fdino[me], path) }
#ifndef NO_PATH_CHECK
    /* inspect_locked_file(): statx(path) compared with s.dev/s.ino */
    if
    :: atomic { path == fdino[me] -> skip }                  /* inspection::ours */
    :: atomic {                                  /* replaced: release(s); close_file(s) */
         path != fdino[me] -> printf("W%d: path check: replaced; release, close, retry\n", me);
         lockowner[fdino[me]] = 0; drop_ref(fdino[me]); fdino[me] = 0
       };
       goto acquire
    fi;
#endif
    /* write_holder_record(): pwrite of the record; acquire() returns true */
    became_holder();
    /* ... the worker acts as the holder ... */
    if
    :: /* WorkerLock::unlock() -> detail::release(): F_UNLCK / LOCK_UN.  The descriptor stays
          open, and the next lock() locks the same inode again (then checks the path). */
       atomic { holds[me] = false; lockowner[fdino[me]] = 0; printf("W%d: unlock()\n", me) }
    :: /* WorkerLock::unlock_and_remove() -> detail::release_and_remove() */
       /* lstat(path): st_ino == s.ino ?  (then inspect_contents(): a record) */
       if
       :: atomic { path == fdino[me] -> holds[me] = false;
                   printf("W%d: unlock_and_remove(): lstat(path) is inode %d, ours\n", me, path) }
          atomic {   /* ::unlink(path): removes whatever the path names NOW */
            if
            :: path != 0 ->
               i = path;
#ifndef STRICT_REMOVER
               if
               :: i != fdino[me] -> stolen[i] = true  /* lstat() went stale (outsider) */
               :: else -> skip
               fi;
#endif
               printf("W%d: unlink(path) removes inode %d\n", me, i);
               path = 0;
               drop_ref(i);
               i = 0
            :: else -> skip   /* ENOENT */
            fi
          }
       :: atomic { path != fdino[me] -> holds[me] = false } /* not ours any more: no unlink */
       fi;
       /* release(s); close_file(s) */
       atomic { lockowner[fdino[me]] = 0; drop_ref(fdino[me]); fdino[me] = 0 }
    fi
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
