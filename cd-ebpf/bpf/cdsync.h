/* SPDX-License-Identifier: Apache-2.0 */
/*
 * cdsync kernel <-> user-space ABI. Mirrored by `cd-ebpf/src/abi.rs`; any change
 * here must change both (sizes are asserted on both sides).
 *
 * One ring-buffer record = `struct cd_event` (64 bytes) followed by exactly
 * `walk_len[0] + str_len[0] + walk_len[1] + str_len[1]` bytes of path data, in
 * this order:
 *
 *   walk[0] str[0] walk[1] str[1]
 *
 * - walk[i]: names of the dentries from the resolved object (or base directory)
 *   up to, but not including, the watched root, LEAF FIRST, each NUL-terminated.
 *   Empty when the object/base is the root itself (or for an ancestor match).
 * - str[i]: the user-supplied path string of a path-based syscall, NUL-terminated
 *   (empty for fd-based events). It is relative to walk[i]; its first skip[i]
 *   bytes must be dropped first (set when the base directory was an *ancestor* of
 *   the root, see `struct cd_anc_key`). User space joins reverse(walk) + str and
 *   normalises `.`, `..` and `//`.
 *
 * A rename whose new path is outside every root (root[1] == 0) still carries the
 * raw new path string in str[1] (walk[1] empty) and its dirfd in dfd[1], so user
 * space can tell (via /proc/<pid>/{cwd,root,fd}) whether a directory left the root.
 *
 * Part 1 is used only by rename (new path). link/symlink report only the new path,
 * in part 0. Records are emitted with bpf_ringbuf_output() of the exact size
 * (header + data), so a record never carries padding beyond the header.
 */
#ifndef CDSYNC_H
#define CDSYNC_H

#define CD_ABI_VERSION 1

/* kinds (numbers are ABI) */
#define CD_K_OPEN_WRITE 1  /* fd opened for write; flag CREATED when it created the file */
#define CD_K_MODIFY 2      /* write/pwrite/writev/splice/sendfile/copy_file_range/fallocate/(f)truncate */
#define CD_K_MMAP_WRITE 3  /* mmap(PROT_WRITE, MAP_SHARED) */
#define CD_K_CLOSE_WRITE 4 /* close of an fd recorded as opened for write */
#define CD_K_CREATE 5      /* mknod(at) */
#define CD_K_MKDIR 6
#define CD_K_SYMLINK 7
#define CD_K_LINK 8
#define CD_K_ATTRIB 9
#define CD_K_UNLINK 10
#define CD_K_RMDIR 11
#define CD_K_RENAME 12
#define CD_K_OVERFLOW 13 /* a path on watched device `dev` was too deep/long to resolve */

/* flags */
#define CD_F_DIR 0x1         /* object is a directory */
#define CD_F_DIR_KNOWN 0x2   /* CD_F_DIR is meaningful (fd-based events, mkdir, rmdir) */
#define CD_F_CREATED 0x4     /* open created the file (FMODE_CREATED) */
#define CD_F_TRUNC 0x8       /* O_TRUNC / truncate */
#define CD_F_EXCHANGE 0x10   /* renameat2(RENAME_EXCHANGE) */
#define CD_F_IO_URING 0x20   /* came from an io_uring request */

#define CD_DATA_MASK 16383u  /* all data offsets are masked with this */
#define CD_PART_MAX 4096u    /* max bytes of one walk or one string */
#define CD_NAME_MAX 256u     /* max bytes read per name (255 + NUL) */
#define CD_MAX_DEPTH 48      /* max directory levels walked below a root */
#define CD_ANC_REM_MAX 256u  /* max bytes of a root's path below its ancestor */

struct cd_event {
	__u32 kind;
	__u32 flags;
	__u32 root[2];     /* watched root id per part (0 = outside every root) */
	__u32 pid;         /* tgid */
	__u32 tid;
	__u64 seq;         /* global event sequence number (gaps = drops) */
	__u64 ts_ns;       /* bpf_ktime_get_ns() */
	__u16 walk_len[2];
	__u16 str_len[2];
	__u16 skip[2];
	__u32 dev;         /* kernel s_dev (for CD_K_OVERFLOW) */
	__s32 dfd[2];      /* dirfd argument per part (path-based events; AT_FDCWD = -100) */
};
_Static_assert(sizeof(struct cd_event) == 64, "cd_event ABI size");

/* key of the `roots` map (and of `ancestors`): kernel s_dev + inode number */
struct cd_ino_key {
	__u32 dev;
	__u32 pad;
	__u64 ino;
};
_Static_assert(sizeof(struct cd_ino_key) == 16, "cd_ino_key ABI size");

/* key of `anc_prefix`: an ancestor directory of a root plus the root's path
 * relative to it (no leading or trailing slash), as its byte length and FNV-1a
 * 64-bit hash. */
struct cd_anc_key {
	__u32 dev;
	__u32 len;
	__u64 ino;
	__u64 hash;
};
_Static_assert(sizeof(struct cd_anc_key) == 24, "cd_anc_key ABI size");

#define CD_FNV_OFFSET 0xcbf29ce484222325ULL
#define CD_FNV_PRIME 0x100000001b3ULL

#endif
