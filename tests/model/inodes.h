/* tests/model/inodes.h: the file system shared by election.pml and coordinator.pml (spin
 * runs the C preprocessor on a model): inodes, the path's binding, one OFD/flock lock per
 * inode, and the outsider who deletes or replaces the file once.
 *
 * refs = names + open descriptors of an inode; an inode with neither is freed and its number
 * reused.  Open descriptors keep their inode after unlink or rename.  `stolen`: the inode's
 * name was removed by someone who did not hold its lock (see each model's property).
 */

#define NINO 7 /* inode numbers 1..NINO-1; 0 = none */

byte path = 0;          /* the inode the path names, 0: no file */
byte lockowner[NINO];   /* 1 + the worker holding the inode's lock, 0: unlocked */
byte refs[NINO];        /* names + open descriptors of each inode; 0: free */
bool stolen[NINO];      /* its name was removed by someone not holding its lock */

inline alloc(i) {
  i = 1;
  do
  :: i < NINO && refs[i] != 0 -> i++
  :: else -> break
  od;
  assert(i < NINO) /* NINO is large enough for the model */
}

inline drop_ref(i) {
  refs[i]--;
  if
  :: refs[i] == 0 -> assert(lockowner[i] == 0); stolen[i] = false
  :: else -> skip
  fi
}

/* Someone else, once: rm path | mv path /elsewhere | mv /new path | nothing. */
active proctype outsider() {
  byte old, i;
  if
  :: atomic { path != 0 -> old = path; path = 0; stolen[old] = true; drop_ref(old);  /* rm */
              printf("outsider: rm path (inode %d)\n", old) }
  :: atomic { path != 0 -> old = path; path = 0; stolen[old] = true;  /* mv: named elsewhere */
              printf("outsider: mv path elsewhere (inode %d)\n", old) }
  :: atomic {                                                    /* mv /new path: replace */
       old = path; alloc(i); refs[i] = 1; path = i;
       printf("outsider: mv new path (inode %d replaces %d)\n", i, old);
       if
       :: old != 0 -> stolen[old] = true; drop_ref(old)
       :: else -> skip
       fi
     }
  :: true -> skip
  fi
}
