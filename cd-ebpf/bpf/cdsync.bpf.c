// SPDX-License-Identifier: GPL-2.0 OR Apache-2.0
/*
 * cdsync change capture: BTF tracepoints on raw syscalls and io_uring.
 *
 * Attach points (all tp_btf, Linux >= 5.5; nothing newer than 6.1 is used):
 *   sys_enter            close(): emit CLOSE_WRITE for fds recorded in `wfds`
 *   sys_exit             every other file syscall, on success only. Arguments are
 *                        read back from the syscall's saved pt_regs (x86_64 never
 *                        rewrites the argument registers of these syscalls), so no
 *                        per-thread enter->exit map is needed.
 *   io_uring_submit_req  (6.4+) / io_uring_submit_sqe (5.19..6.3): IORING_OP_CLOSE;
 *                        path operations (renameat, unlinkat, mkdirat, symlinkat,
 *                        linkat) are resolved here, while their names are alive
 *   io_uring_complete    writes, fallocate, splice, ftruncate, openat(2); the path
 *                        operations resolved at submission, on success only
 *   io_uring_cqe_overflow path operations whose completion overflowed the CQ ring
 *                        (newer kernels fire no io_uring_complete for those)
 *
 * Paths. fd-based events walk the file's dentry up the d_parent chain until a
 * dentry whose (s_dev, i_ino) is in `roots` (a watched root), emitting the names
 * leaf first. Path-based events (unlink, rename, mkdir, chmod, ...) are handled at
 * sys_exit after success: the object may be gone (unlink, rename source), so we
 * resolve the *base* directory instead -- the dirfd's file, cwd (AT_FDCWD) or the
 * task's root directory (absolute paths) -- walk it up to a watched root, and
 * append the user's path string (bpf_probe_read_user_str). User space normalises
 * `.`/`..`. When the base directory is not inside a root but is an *ancestor* of
 * one (e.g. "/" for absolute paths, or cwd=/srv for "www/a"), the `ancestors` map
 * holds the root's path relative to it and the string is prefix-matched in the
 * kernel. Anything that is not inside a watched root is dropped here.
 *
 * io_uring path operations run later, in io-wq, and by their completion the
 * kernel has freed their struct filename. So they are resolved the same way at
 * submission, from the kernel copies of the names (prep has run), kept in
 * `uring_recs` and emitted at the completion if it succeeded. Whenever such a
 * record cannot be kept or matched to its completion, `drops` is bumped so user
 * space reports the loss.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "cdsync.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define AT_FDCWD -100
#define AT_REMOVEDIR 0x200
#define RENAME_EXCHANGE 2
#define O_WRONLY 01
#define O_RDWR 02
#define O_CREAT 0100
#define O_TRUNC 01000
#define O_PATH 010000000
#define PROT_WRITE 0x2
#define MAP_TYPE 0x0f
#define MAP_SHARED 0x01
#define MAP_SHARED_VALIDATE 0x03
#define FMODE_WRITE 0x2
#define FMODE_CREATED 0x100000
#define S_IFMT 00170000
#define S_IFREG 0100000
#define S_IFDIR 0040000
#define TS_COMPAT 0x0002
#define MODIFY_INTERVAL_NS 1000000000ULL

/* x86_64 syscall numbers */
#define NR_write 1
#define NR_open 2
#define NR_close 3
#define NR_mmap 9
#define NR_pwrite64 18
#define NR_writev 20
#define NR_sendfile 40
#define NR_truncate 76
#define NR_ftruncate 77
#define NR_rename 82
#define NR_mkdir 83
#define NR_rmdir 84
#define NR_creat 85
#define NR_link 86
#define NR_unlink 87
#define NR_symlink 88
#define NR_chmod 90
#define NR_fchmod 91
#define NR_chown 92
#define NR_fchown 93
#define NR_lchown 94
#define NR_utime 132
#define NR_mknod 133
#define NR_utimes 235
#define NR_openat 257
#define NR_mkdirat 258
#define NR_mknodat 259
#define NR_fchownat 260
#define NR_futimesat 261
#define NR_unlinkat 263
#define NR_renameat 264
#define NR_linkat 265
#define NR_symlinkat 266
#define NR_fchmodat 268
#define NR_splice 275
#define NR_tee 276
#define NR_vmsplice 278
#define NR_utimensat 280
#define NR_fallocate 285
#define NR_pwritev 296
#define NR_renameat2 316
#define NR_copy_file_range 326
#define NR_pwritev2 328
#define NR_openat2 437
#define NR_fchmodat2 452

/* io_uring opcodes (UAPI, stable) */
#define IOP_WRITEV 2
#define IOP_WRITE_FIXED 5
#define IOP_FALLOCATE 17
#define IOP_OPENAT 18
#define IOP_CLOSE 19
#define IOP_WRITE 23
#define IOP_OPENAT2 28
#define IOP_SPLICE 30
#define IOP_RENAMEAT 35
#define IOP_UNLINKAT 36
#define IOP_MKDIRAT 37
#define IOP_SYMLINKAT 38
#define IOP_LINKAT 39
#define IOP_FTRUNCATE 55
#define IOP_WRITEV_FIXED 61

/* REQ_F_CQE_SKIP_BIT = IOSQE_CQE_SKIP_SUCCESS_BIT (UAPI) in every kernel that has it */
#define REQ_F_CQE_SKIP 0x40

/* scratch slots: one per attach context so nested programs never share */
#define SLOT_SYS 0
#define SLOT_URING_SUBMIT 1
#define SLOT_URING_COMPLETE 2
#define NSLOTS 3

struct scratch {
	struct cd_event ev;
	/* CD_DATA_MASK + 1 plus room for one max-size read at a masked offset */
	char data[CD_DATA_MASK + 1 + CD_PART_MAX];
	/* work area, never emitted */
	struct cd_ino_key base_key;
	__u32 kstr; /* path strings are kernel memory (io_uring's struct filename) */
};

struct wfd_key {
	__u32 tgid;
	__u32 fd;
};

struct wfd_val {
	__u64 last_modify_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 32 * 1024 * 1024); /* overridden by the loader */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} drops SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} seqctr SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NSLOTS);
	__type(key, __u32);
	__type(value, struct scratch);
} scratch SEC(".maps");

/* (s_dev, ino) of each watched root -> root id (non-zero) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct cd_ino_key);
	__type(value, __u32);
} roots SEC(".maps");

/* s_dev -> number of roots on it: cheap pre-filter before any walk */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u32);
} root_devs SEC(".maps");

/* (s_dev, ino) of each proper ancestor directory of a root -> number of roots below */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cd_ino_key);
	__type(value, __u32);
} ancestors SEC(".maps");

/* (ancestor, length and FNV-1a hash of the root's path relative to it) -> root id */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct cd_anc_key);
	__type(value, __u32);
} anc_prefix SEC(".maps");

/* fds opened for write: (tgid, fd) -> last Modify emitted (rate limit) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct wfd_key);
	__type(value, struct wfd_val);
} wfds SEC(".maps");

/*
 * io_uring path operations (renameat, unlinkat, mkdirat, symlinkat, linkat) are
 * resolved at submission, while the request's struct filename strings are alive,
 * and reported at their completion, after the operation happened and only if it
 * succeeded. Every such request in flight has a `uring_pend` entry (LRU: a few
 * bytes each); those inside a root also keep their finished record in
 * `uring_recs`, keyed by the request pointer.
 */
#define UP_NONE 0 /* nothing to report (outside every root) */
#define UP_REC 1  /* the record is in uring_recs */

struct uring_pend {
	__u32 state;
	__u32 len; /* data bytes of the record */
	__u64 ctx; /* struct io_ring_ctx *, for io_uring_cqe_overflow */
	__u64 user_data;
};

struct uring_rec {
	struct cd_event ev; /* ts_ns = submission time until emitted (uring_gc_cb) */
	char data[CD_DATA_MASK + 1];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct uring_pend);
} uring_pend SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, __u64);
	__type(value, struct uring_rec);
} uring_recs SEC(".maps");

/* the last completion seen by io_uring_complete on this CPU (see cd_uring_cqe_overflow) */
struct uring_last {
	__u64 ctx;
	__u64 user_data;
	__s64 res;
	__u64 valid;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct uring_last);
} uring_last SEC(".maps");

/* a record older than this in uring_recs is presumed leaked (its completion was
 * never seen) and may be dropped when the map is full */
#define URING_STALE_NS (60ULL * 1000000000ULL)

/* status codes of the resolvers (>= 0 means "new data offset") */
#define R_NOT_WATCHED -1
#define R_OVERFLOW -2
#define R_ERR -3

static __always_inline struct scratch *get_scratch(__u64 slot)
{
	__u32 k = slot;

	return bpf_map_lookup_elem(&scratch, &k);
}

/* file pointer of `fd` in the current task, 0 if none */
static __always_inline __u64 fd_to_file(__u64 fd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	struct file **arr;
	struct file *f = 0;
	unsigned int max;

	if (!fdt)
		return 0;
	max = BPF_CORE_READ(fdt, max_fds);
	if (fd >= max || fd > 0x7fffffff)
		return 0;
	arr = BPF_CORE_READ(fdt, fd);
	if (bpf_probe_read_kernel(&f, sizeof(f), &arr[fd]))
		return 0;
	return (__u64)f;
}

/*
 * Walk `dentry` up to a watched root, writing names leaf first at data[off...].
 * Returns the new offset and stores the root id / walk length in part `part` of
 * the scratch header, or a negative R_* status.
 */
__noinline int walk(__u64 slot, __u64 part, __u64 dentry, __u64 off)
{
	struct scratch *s = get_scratch(slot);
	struct dentry *d = (struct dentry *)dentry;
	struct cd_ino_key key = {};
	__u64 start = off;
	__u32 dev;
	int i;

	part &= 1;
	if (!s || !d)
		return R_ERR;
	dev = BPF_CORE_READ(d, d_sb, s_dev);
	if (!bpf_map_lookup_elem(&root_devs, &dev))
		return R_NOT_WATCHED;
	key.dev = dev;

	for (i = 0; i < CD_MAX_DEPTH; i++) {
		struct dentry *parent;
		const unsigned char *name;
		__u32 *root;
		long n;

		key.ino = BPF_CORE_READ(d, d_inode, i_ino);
		root = bpf_map_lookup_elem(&roots, &key);
		if (root) {
			s->ev.root[part] = *root;
			s->ev.walk_len[part] = (off - start) & 0xffff;
			return off;
		}
		parent = BPF_CORE_READ(d, d_parent);
		if (!parent || parent == d)
			return R_NOT_WATCHED; /* reached the file-system root */
		if (off - start > CD_PART_MAX - CD_NAME_MAX) {
			s->ev.dev = dev;
			return R_OVERFLOW;
		}
		name = BPF_CORE_READ(d, d_name.name);
		n = bpf_probe_read_kernel_str(&s->data[off & CD_DATA_MASK], CD_NAME_MAX, name);
		if (n <= 0)
			return R_ERR;
		off += n;
		d = parent;
	}
	s->ev.dev = dev;
	return R_OVERFLOW;
}

/*
 * The string at data[off..off+len) (len includes the NUL) is relative to the
 * ancestor directory s->base_key of one or more roots. Hash each prefix that ends
 * at a '/' (FNV-1a 64) and look it up in `anc_prefix`. Returns the root id and
 * stores the skip count, or 0. User space re-checks the skipped prefix.
 */
__noinline int match_ancestor(__u64 slot, __u64 part, __u64 off, __u64 len)
{
	struct scratch *s = get_scratch(slot);
	struct cd_anc_key key = {};
	__u64 h = CD_FNV_OFFSET;
	__u64 lead = 0;
	__u64 i;

	part &= 1;
	if (!s)
		return 0;
	key.dev = s->base_key.dev;
	key.ino = s->base_key.ino;
	if (len > 1 && s->data[off & CD_DATA_MASK] == '/')
		lead = 1;
	for (i = 0; i < CD_ANC_REM_MAX; i++) {
		char c;
		__u32 *root;

		if (lead + i >= len)
			return 0;
		c = s->data[(off + lead + i) & CD_DATA_MASK];
		if (c == 0)
			return 0;
		if (c == '/' && i > 0) {
			key.len = i;
			key.hash = h;
			root = bpf_map_lookup_elem(&anc_prefix, &key);
			if (root) {
				s->ev.skip[part] = (lead + i + 1) & 0xffff;
				return *root;
			}
		}
		h = (h ^ (__u8)c) * CD_FNV_PRIME;
	}
	return 0;
}

/* Copies the NUL-terminated path string `p` to data[off..]: user memory for
 * syscalls, kernel memory (struct filename) when s->kstr is set (io_uring). */
static __always_inline long read_path_str(struct scratch *s, __u64 off, __u64 p)
{
	if (s->kstr)
		return bpf_probe_read_kernel_str(&s->data[off & CD_DATA_MASK], CD_PART_MAX, (void *)p);
	return bpf_probe_read_user_str(&s->data[off & CD_DATA_MASK], CD_PART_MAX, (void *)p);
}

/*
 * Resolve a path argument (dirfd, path string) into part `part` at data[off..].
 * Returns the new offset or a negative R_* status.
 */
__noinline int resolve_path(__u64 slot, __u64 part, __u64 dfd, __u64 upath, __u64 off)
{
	struct scratch *s = get_scratch(slot);
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct dentry *base;
	char c = 0;
	int r;
	long n;

	part &= 1;
	if (!s || !upath)
		return R_ERR;
	s->ev.root[part] = 0;
	s->ev.dfd[part] = (__s32)dfd;
	s->ev.walk_len[part] = 0;
	s->ev.str_len[part] = 0;
	s->ev.skip[part] = 0;
	if (s->kstr ? bpf_probe_read_kernel(&c, 1, (void *)upath)
		    : bpf_probe_read_user(&c, 1, (void *)upath))
		return R_ERR;
	if (c == '/') {
		base = BPF_CORE_READ(task, fs, root.dentry);
	} else if ((int)dfd == AT_FDCWD) {
		base = BPF_CORE_READ(task, fs, pwd.dentry);
	} else {
		struct file *f = (struct file *)fd_to_file((__u32)dfd);
		if (!f)
			return R_ERR;
		base = BPF_CORE_READ(f, f_path.dentry);
	}
	if (!base)
		return R_ERR;

	r = walk(slot, part, (__u64)base, off);
	if (r == R_OVERFLOW || r == R_ERR)
		return r;
	if (r >= 0) {
		off = r;
		n = read_path_str(s, off, upath);
		if (n <= 0)
			return R_ERR;
		s->ev.str_len[part] = n & 0xffff;
		return off + n;
	}

	/* not inside a root: is the base an ancestor of one? */
	{
		struct cd_ino_key key = {};
		__u32 root;

		key.dev = BPF_CORE_READ(base, d_sb, s_dev);
		key.ino = BPF_CORE_READ(base, d_inode, i_ino);
		if (!bpf_map_lookup_elem(&ancestors, &key))
			return R_NOT_WATCHED;
		n = read_path_str(s, off, upath);
		if (n <= 0)
			return R_ERR;
		s->base_key = key;
		root = match_ancestor(slot, part, off, n);
		if (!root)
			return R_NOT_WATCHED;
		s->ev.root[part] = root;
		s->ev.str_len[part] = n & 0xffff;
		return off + n;
	}
}

/* Resolve an open file into part 0. Returns the new offset or an R_* status. */
__noinline int resolve_file(__u64 slot, __u64 file, __u64 regular_only)
{
	struct scratch *s = get_scratch(slot);
	struct file *f = (struct file *)file;
	struct inode *ino;
	struct dentry *d;
	umode_t mode;

	if (!s || !f)
		return R_ERR;
	s->ev.root[0] = s->ev.root[1] = 0;
	s->ev.walk_len[0] = s->ev.walk_len[1] = 0;
	s->ev.str_len[0] = s->ev.str_len[1] = 0;
	s->ev.skip[0] = s->ev.skip[1] = 0;
	ino = BPF_CORE_READ(f, f_inode);
	if (!ino)
		return R_ERR;
	mode = BPF_CORE_READ(ino, i_mode);
	if (regular_only && (mode & S_IFMT) != S_IFREG)
		return R_NOT_WATCHED;
	if (BPF_CORE_READ(ino, i_nlink) == 0)
		return R_NOT_WATCHED; /* unlinked while open */
	s->ev.flags |= CD_F_DIR_KNOWN;
	if ((mode & S_IFMT) == S_IFDIR)
		s->ev.flags |= CD_F_DIR;
	d = BPF_CORE_READ(f, f_path.dentry);
	return walk(slot, 0, (__u64)d, 0);
}

/* Emit the record in `slot` (header + `len` data bytes). */
__noinline int emit(__u64 slot, __u64 len)
{
	struct scratch *s = get_scratch(slot);
	__u32 zero = 0;
	__u64 *seq, *drop;
	__u64 id = bpf_get_current_pid_tgid();

	if (!s)
		return 0;
	seq = bpf_map_lookup_elem(&seqctr, &zero);
	if (seq)
		s->ev.seq = __sync_fetch_and_add(seq, 1);
	s->ev.ts_ns = bpf_ktime_get_ns();
	s->ev.pid = id >> 32;
	s->ev.tid = (__u32)id;
	if (len > CD_DATA_MASK + 1)
		len = CD_DATA_MASK + 1;
	if (bpf_ringbuf_output(&events, s, sizeof(struct cd_event) + len, 0)) {
		drop = bpf_map_lookup_elem(&drops, &zero);
		if (drop)
			*drop += 1;
	}
	return 0;
}

/* Count a record that was lost: user space reports Lost for every root. */
static __always_inline void count_drop(void)
{
	__u32 zero = 0;
	__u64 *drop = bpf_map_lookup_elem(&drops, &zero);

	if (drop)
		__sync_fetch_and_add(drop, 1);
}

/* Turn the record in `slot` into an OVERFLOW record (no data) for the device
 * stored by walk(). */
static __always_inline void prep_overflow(__u32 slot)
{
	struct scratch *s = get_scratch(slot);

	if (!s)
		return;
	s->ev.kind = CD_K_OVERFLOW;
	s->ev.root[0] = s->ev.root[1] = 0;
	s->ev.walk_len[0] = s->ev.walk_len[1] = 0;
	s->ev.str_len[0] = s->ev.str_len[1] = 0;
	s->ev.skip[0] = s->ev.skip[1] = 0;
}

/* Emit an OVERFLOW record for the device stored by walk(). */
static __always_inline void emit_overflow(__u32 slot)
{
	prep_overflow(slot);
	emit(slot, 0);
}

static __always_inline int begin_(__u32 slot, __u32 kind, __u32 flags)
{
	struct scratch *s = get_scratch(slot);

	if (!s)
		return -1;
	s->ev.kind = kind;
	s->ev.flags = flags;
	s->ev.dev = 0;
	s->ev.dfd[0] = s->ev.dfd[1] = 0;
	s->kstr = 0;
	return 0;
}

/* fd-based event */
__noinline int fd_event(__u64 slot, __u64 kind, __u64 flags, __u64 file)
{
	int r;

	if (begin_(slot, kind, flags))
		return 0;
	r = resolve_file(slot, file, kind == CD_K_MODIFY || kind == CD_K_MMAP_WRITE);
	if (r >= 0)
		emit(slot, r);
	else if (r == R_OVERFLOW)
		emit_overflow(slot);
	return 0;
}

/*
 * Build the path-based record begun by begin_() in `slot`; part 1 only when
 * upath2 != 0. Returns its data length (>= 0; an OVERFLOW record when a path was
 * too deep) when there is something to report, or -1 (outside every root, or
 * unreadable).
 */
__noinline int path_record2(__u64 slot, __u64 dfd, __u64 upath, __u64 dfd2, __u64 upath2)
{
	struct scratch *s;
	int r0, r1 = R_NOT_WATCHED, off;

	r0 = resolve_path(slot, 0, dfd, upath, 0);
	if (r0 == R_OVERFLOW) {
		prep_overflow(slot);
		return 0;
	}
	off = r0 >= 0 ? r0 : 0;
	if (upath2) {
		if (r0 < 0) {
			/* part 0 outside every root: keep no data for it */
			s = get_scratch(slot);
			if (!s)
				return -1;
			s->ev.root[0] = 0;
			s->ev.walk_len[0] = s->ev.str_len[0] = s->ev.skip[0] = 0;
		}
		r1 = resolve_path(slot, 1, dfd2, upath2, off);
		if (r1 == R_OVERFLOW) {
			prep_overflow(slot);
			return 0;
		}
		if (r1 < 0) {
			long n = 0;

			s = get_scratch(slot);
			if (!s)
				return -1;
			s->ev.root[1] = 0;
			s->ev.walk_len[1] = s->ev.str_len[1] = s->ev.skip[1] = 0;
			if (r0 >= 0) {
				/* renamed out of the root: keep the raw target (see cdsync.h) */
				n = read_path_str(s, off, upath2);
				if (n > 0) {
					s->ev.str_len[1] = n & 0xffff;
					off += n;
				}
			}
		} else {
			off = r1;
		}
	} else {
		s = get_scratch(slot);
		if (!s)
			return -1;
		s->ev.root[1] = 0;
		s->ev.walk_len[1] = s->ev.str_len[1] = s->ev.skip[1] = 0;
	}
	if (r0 < 0 && r1 < 0)
		return -1;
	return off;
}

static __always_inline int path_event(__u32 slot, __u32 kind, __u32 flags, __u64 dfd, __u64 upath,
				      __u64 dfd2, __u64 upath2)
{
	int r;

	if (begin_(slot, kind, flags))
		return 0;
	r = path_record2(slot, dfd, upath, dfd2, upath2);
	if (r >= 0)
		emit(slot, r);
	return 0;
}

static __always_inline __u64 wfd_key_of(__u64 fd, struct wfd_key *k)
{
	k->tgid = bpf_get_current_pid_tgid() >> 32;
	k->fd = (__u32)fd;
	return 0;
}

/* a write-like operation on fd: rate limited per (tgid, fd) */
static __always_inline void modify_fd(__u32 slot, __u64 fd, __u32 flags)
{
	struct wfd_key k = {};
	struct wfd_val *v, nv = {};
	__u64 now = bpf_ktime_get_ns();
	__u64 file;

	if ((__s64)fd < 0)
		return;
	wfd_key_of(fd, &k);
	v = bpf_map_lookup_elem(&wfds, &k);
	if (v && !(flags & CD_F_TRUNC) && now - v->last_modify_ns < MODIFY_INTERVAL_NS)
		return;
	file = fd_to_file(fd);
	if (!file)
		return;
	if (v) {
		v->last_modify_ns = now;
	} else {
		/* inherited or dup'ed write fd: remember it so later writes are cheap */
		struct file *f = (struct file *)file;
		if (!(BPF_CORE_READ(f, f_mode) & FMODE_WRITE))
			return;
		nv.last_modify_ns = now;
		/* only remember fds that are actually inside a root (checked by fd_event) */
	}
	fd_event(slot, CD_K_MODIFY, flags, file);
	if (!v) {
		struct scratch *s = get_scratch(slot);
		/* fd_event left root[0] set when the file is inside a root */
		if (s && s->ev.kind == CD_K_MODIFY && s->ev.root[0])
			bpf_map_update_elem(&wfds, &k, &nv, BPF_ANY);
	}
}

static __always_inline void open_done(__u32 slot, __u64 fd, __u64 oflags, __u32 extra)
{
	struct wfd_key k = {};
	struct wfd_val nv = {};
	struct file *f;
	__u32 fmode, flags = extra;
	struct scratch *s;

	if ((__s64)fd < 0)
		return;
	if (oflags & O_PATH)
		return;
	f = (struct file *)fd_to_file(fd);
	if (!f)
		return;
	fmode = BPF_CORE_READ(f, f_mode);
	if (!(fmode & (FMODE_WRITE | FMODE_CREATED)) && !(oflags & O_TRUNC))
		return;
	if (fmode & FMODE_CREATED)
		flags |= CD_F_CREATED;
	if (oflags & O_TRUNC)
		flags |= CD_F_TRUNC;
	fd_event(slot, CD_K_OPEN_WRITE, flags, (__u64)f);
	s = get_scratch(slot);
	if (s && s->ev.kind == CD_K_OPEN_WRITE && s->ev.root[0] && (fmode & FMODE_WRITE)) {
		wfd_key_of(fd, &k);
		bpf_map_update_elem(&wfds, &k, &nv, BPF_ANY);
	}
}

static __always_inline void close_fd(__u32 slot, __u64 fd, __u32 flags)
{
	struct wfd_key k = {};
	__u64 file;

	if ((__s64)fd < 0)
		return;
	wfd_key_of(fd, &k);
	if (!bpf_map_lookup_elem(&wfds, &k))
		return;
	bpf_map_delete_elem(&wfds, &k);
	file = fd_to_file(fd);
	if (file)
		fd_event(slot, CD_K_CLOSE_WRITE, flags, file);
}

static __always_inline int is_compat(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();

	if (bpf_core_field_exists(task->thread_info.status))
		return BPF_CORE_READ(task, thread_info.status) & TS_COMPAT;
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(cd_sys_enter, struct pt_regs *regs, long id)
{
	if (id != NR_close)
		return 0;
	if (is_compat())
		return 0;
	close_fd(SLOT_SYS, BPF_CORE_READ(regs, di), 0);
	return 0;
}

static __always_inline int sys_exit_path(__u32 nr, __u64 a0, __u64 a1, __u64 a2, __u64 a3, __u64 a4)
{
	const __u32 slot = SLOT_SYS;

	switch (nr) {
	case NR_truncate:
		return path_event(slot, CD_K_MODIFY, CD_F_TRUNC, AT_FDCWD, a0, 0, 0);
	case NR_unlink:
		return path_event(slot, CD_K_UNLINK, 0, AT_FDCWD, a0, 0, 0);
	case NR_unlinkat:
		if (a2 & AT_REMOVEDIR)
			return path_event(slot, CD_K_RMDIR, CD_F_DIR | CD_F_DIR_KNOWN, a0, a1, 0, 0);
		return path_event(slot, CD_K_UNLINK, 0, a0, a1, 0, 0);
	case NR_rmdir:
		return path_event(slot, CD_K_RMDIR, CD_F_DIR | CD_F_DIR_KNOWN, AT_FDCWD, a0, 0, 0);
	case NR_rename:
		return path_event(slot, CD_K_RENAME, 0, AT_FDCWD, a0, AT_FDCWD, a1);
	case NR_renameat:
		return path_event(slot, CD_K_RENAME, 0, a0, a1, a2, a3);
	case NR_renameat2:
		return path_event(slot, CD_K_RENAME, (a4 & RENAME_EXCHANGE) ? CD_F_EXCHANGE : 0, a0, a1,
				  a2, a3);
	case NR_mkdir:
		return path_event(slot, CD_K_MKDIR, CD_F_DIR | CD_F_DIR_KNOWN, AT_FDCWD, a0, 0, 0);
	case NR_mkdirat:
		return path_event(slot, CD_K_MKDIR, CD_F_DIR | CD_F_DIR_KNOWN, a0, a1, 0, 0);
	case NR_mknod:
		return path_event(slot, CD_K_CREATE, CD_F_DIR_KNOWN, AT_FDCWD, a0, 0, 0);
	case NR_mknodat:
		return path_event(slot, CD_K_CREATE, CD_F_DIR_KNOWN, a0, a1, 0, 0);
	case NR_link:
		return path_event(slot, CD_K_LINK, CD_F_DIR_KNOWN, AT_FDCWD, a1, 0, 0);
	case NR_linkat:
		return path_event(slot, CD_K_LINK, CD_F_DIR_KNOWN, a2, a3, 0, 0);
	case NR_symlink:
		return path_event(slot, CD_K_SYMLINK, CD_F_DIR_KNOWN, AT_FDCWD, a1, 0, 0);
	case NR_symlinkat:
		return path_event(slot, CD_K_SYMLINK, CD_F_DIR_KNOWN, a1, a2, 0, 0);
	case NR_chmod:
	case NR_chown:
	case NR_lchown:
	case NR_utime:
	case NR_utimes:
		return path_event(slot, CD_K_ATTRIB, 0, AT_FDCWD, a0, 0, 0);
	case NR_fchmodat:
	case NR_fchmodat2:
	case NR_fchownat:
	case NR_futimesat:
		return path_event(slot, CD_K_ATTRIB, 0, a0, a1, 0, 0);
	case NR_utimensat:
		if (!a1)
			return fd_event(slot, CD_K_ATTRIB, 0, fd_to_file(a0));
		return path_event(slot, CD_K_ATTRIB, 0, a0, a1, 0, 0);
	}
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(cd_sys_exit, struct pt_regs *regs, long ret)
{
	__u64 a0, a1, a2, a3, a4;
	__u32 nr;

	if (ret < 0 && !(ret < -4095)) /* failed (mmap may return "negative" addresses) */
		return 0;
	nr = BPF_CORE_READ(regs, orig_ax);
	switch (nr) {
	case NR_write:
	case NR_pwrite64:
	case NR_writev:
	case NR_pwritev:
	case NR_pwritev2:
	case NR_sendfile:
	case NR_splice:
	case NR_tee:
	case NR_vmsplice:
	case NR_copy_file_range:
	case NR_ftruncate:
	case NR_fallocate:
	case NR_open:
	case NR_creat:
	case NR_openat:
	case NR_openat2:
	case NR_mmap:
	case NR_fchmod:
	case NR_fchown:
	case NR_truncate:
	case NR_unlink:
	case NR_unlinkat:
	case NR_rmdir:
	case NR_rename:
	case NR_renameat:
	case NR_renameat2:
	case NR_mkdir:
	case NR_mkdirat:
	case NR_mknod:
	case NR_mknodat:
	case NR_link:
	case NR_linkat:
	case NR_symlink:
	case NR_symlinkat:
	case NR_chmod:
	case NR_chown:
	case NR_lchown:
	case NR_utime:
	case NR_utimes:
	case NR_fchmodat:
	case NR_fchmodat2:
	case NR_fchownat:
	case NR_futimesat:
	case NR_utimensat:
		break;
	default:
		return 0;
	}
	if (is_compat())
		return 0;
	a0 = BPF_CORE_READ(regs, di);
	a1 = BPF_CORE_READ(regs, si);
	a2 = BPF_CORE_READ(regs, dx);
	a3 = BPF_CORE_READ(regs, r10);
	a4 = BPF_CORE_READ(regs, r8);

	switch (nr) {
	case NR_write:
	case NR_pwrite64:
	case NR_writev:
	case NR_pwritev:
	case NR_pwritev2:
	case NR_sendfile:
	case NR_vmsplice:
	case NR_fallocate:
		if (ret > 0 || nr == NR_fallocate)
			modify_fd(SLOT_SYS, a0, 0);
		return 0;
	case NR_tee:
		if (ret > 0)
			modify_fd(SLOT_SYS, a1, 0);
		return 0;
	case NR_splice:
	case NR_copy_file_range:
		if (ret > 0)
			modify_fd(SLOT_SYS, a2, 0);
		return 0;
	case NR_ftruncate:
		modify_fd(SLOT_SYS, a0, CD_F_TRUNC);
		return 0;
	case NR_open:
		open_done(SLOT_SYS, ret, a1, 0);
		return 0;
	case NR_creat:
		open_done(SLOT_SYS, ret, O_CREAT | O_WRONLY | O_TRUNC, 0);
		return 0;
	case NR_openat:
		open_done(SLOT_SYS, ret, a2, 0);
		return 0;
	case NR_openat2: {
		__u64 how_flags = 0;
		bpf_probe_read_user(&how_flags, sizeof(how_flags), (void *)a2);
		open_done(SLOT_SYS, ret, how_flags, 0);
		return 0;
	}
	case NR_mmap: {
		__u64 fd = BPF_CORE_READ(regs, r8);
		__u64 mflags = a3 & MAP_TYPE;
		if ((a2 & PROT_WRITE) && (mflags == MAP_SHARED || mflags == MAP_SHARED_VALIDATE) &&
		    (__s64)(__s32)fd >= 0) {
			__u64 file = fd_to_file((__u32)fd);
			if (file && (BPF_CORE_READ((struct file *)file, f_mode) & FMODE_WRITE))
				fd_event(SLOT_SYS, CD_K_MMAP_WRITE, 0, file);
		}
		return 0;
	}
	case NR_fchmod:
	case NR_fchown:
		fd_event(SLOT_SYS, CD_K_ATTRIB, 0, fd_to_file(a0));
		return 0;
	}
	sys_exit_path(nr, a0, a1, a2, a3, a4);
	return 0;
}

/* ---- io_uring ---------------------------------------------------------- */

/*
 * Path fields of the io_uring path requests. Up to 6.x they are `struct filename *`;
 * later kernels wrap them in `struct delayed_filename` (one pointer). Both layouts
 * are matched by CO-RE; a kernel with neither yields 0 (reported as a loss).
 */
struct delayed_filename___cd {
	struct filename *__incomplete_filename;
};

struct io_rename___dly {
	struct delayed_filename___cd oldpath;
	struct delayed_filename___cd newpath;
};

struct io_unlink___dly {
	struct delayed_filename___cd filename;
};

struct io_mkdir___dly {
	struct delayed_filename___cd filename;
};

struct io_link___dly {
	struct delayed_filename___cd oldpath;
	struct delayed_filename___cd newpath;
};

#define URING_FILENAME(cmd, type, field)                                                   \
	({                                                                                 \
		struct filename *__f = 0;                                                  \
		if (bpf_core_field_exists(struct type##___dly, field))                     \
			__f = BPF_CORE_READ((struct type##___dly *)(cmd),                  \
					    field.__incomplete_filename);                  \
		else if (bpf_core_field_exists(struct type, field))                        \
			__f = BPF_CORE_READ((struct type *)(cmd), field);                  \
		__f ? (__u64)BPF_CORE_READ(__f, name) : 0;                                 \
	})

/* req->flags is 32 bits up to 6.3 and 64 since; the low word holds REQ_F_CQE_SKIP */
static __always_inline __u32 req_flags_lo(struct io_kiocb *req)
{
	__u32 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), (char *)req + bpf_core_field_offset(req->flags));
	return v;
}

struct gc_ctx {
	__u64 now;
};

static long uring_gc_cb(void *map, __u64 *key, struct uring_rec *rec, struct gc_ctx *c)
{
	if (c->now - rec->ev.ts_ns > URING_STALE_NS)
		bpf_map_delete_elem(&uring_recs, key);
	return 0;
}

/*
 * An io_uring path request was submitted (prep done: its names are kernel strings).
 * Resolve its record now and keep it until the completion.
 */
__noinline int uring_path_submit(__u64 reqp, __u64 op)
{
	struct io_kiocb *req = (struct io_kiocb *)reqp;
	void *cmd = &req->cmd;
	struct uring_pend p = {};
	struct scratch *s;
	__u64 key = reqp, n0 = 0, n1 = 0, id;
	__s32 d0 = AT_FDCWD, d1 = AT_FDCWD;
	__u32 kind, flags = CD_F_IO_URING;
	int r;

	switch (op) {
	case IOP_RENAMEAT:
		kind = CD_K_RENAME;
		if (BPF_CORE_READ((struct io_rename *)cmd, flags) & RENAME_EXCHANGE)
			flags |= CD_F_EXCHANGE;
		d0 = BPF_CORE_READ((struct io_rename *)cmd, old_dfd);
		d1 = BPF_CORE_READ((struct io_rename *)cmd, new_dfd);
		n0 = URING_FILENAME(cmd, io_rename, oldpath);
		n1 = URING_FILENAME(cmd, io_rename, newpath);
		if (!n1)
			n0 = 0;
		break;
	case IOP_UNLINKAT:
		kind = CD_K_UNLINK;
		if (BPF_CORE_READ((struct io_unlink *)cmd, flags) & AT_REMOVEDIR) {
			kind = CD_K_RMDIR;
			flags |= CD_F_DIR | CD_F_DIR_KNOWN;
		}
		d0 = BPF_CORE_READ((struct io_unlink *)cmd, dfd);
		n0 = URING_FILENAME(cmd, io_unlink, filename);
		break;
	case IOP_MKDIRAT:
		kind = CD_K_MKDIR;
		flags |= CD_F_DIR | CD_F_DIR_KNOWN;
		d0 = BPF_CORE_READ((struct io_mkdir *)cmd, dfd);
		n0 = URING_FILENAME(cmd, io_mkdir, filename);
		break;
	case IOP_SYMLINKAT:
		/* symlinkat(target = oldpath, new_dfd, linkpath = newpath) */
		kind = CD_K_SYMLINK;
		flags |= CD_F_DIR_KNOWN;
		d0 = BPF_CORE_READ((struct io_link *)cmd, new_dfd);
		n0 = URING_FILENAME(cmd, io_link, newpath);
		break;
	case IOP_LINKAT:
		kind = CD_K_LINK;
		flags |= CD_F_DIR_KNOWN;
		d0 = BPF_CORE_READ((struct io_link *)cmd, new_dfd);
		n0 = URING_FILENAME(cmd, io_link, newpath);
		break;
	default:
		return 0;
	}

	if (!n0) {
		/* layout not understood: whether it touches a root is unknown */
		count_drop();
		return 0;
	}
	r = -1;
	if (!begin_(SLOT_URING_SUBMIT, kind, flags)) {
		s = get_scratch(SLOT_URING_SUBMIT);
		if (!s)
			return 0;
		s->kstr = 1;
		r = path_record2(SLOT_URING_SUBMIT, d0, n0, d1, n1);
	}
	if (req_flags_lo(req) & REQ_F_CQE_SKIP) {
		/* IOSQE_CQE_SKIP_SUCCESS: a success posts no completion, so none would
		 * report this one: report it lost now (user space rescans the root). */
		if (r >= 0)
			count_drop();
		return 0;
	}
	p.state = UP_NONE;
	p.ctx = (__u64)BPF_CORE_READ(req, ctx);
	p.user_data = BPF_CORE_READ(req, cqe.user_data);
	if (r >= 0) {
		s = get_scratch(SLOT_URING_SUBMIT);
		if (!s)
			return 0;
		id = bpf_get_current_pid_tgid();
		s->ev.pid = id >> 32;
		s->ev.tid = (__u32)id;
		s->ev.seq = 0;
		s->ev.ts_ns = bpf_ktime_get_ns();
		if (bpf_map_update_elem(&uring_recs, &key, &s->ev, BPF_ANY)) {
			struct gc_ctx c = { .now = s->ev.ts_ns };

			bpf_for_each_map_elem(&uring_recs, uring_gc_cb, &c, 0);
			if (bpf_map_update_elem(&uring_recs, &key, &s->ev, BPF_ANY)) {
				count_drop();
				r = -1;
			}
		}
		if (r >= 0) {
			p.state = UP_REC;
			p.len = r;
		}
	}
	bpf_map_update_elem(&uring_pend, &key, &p, BPF_ANY);
	return 0;
}

/* Emit the stored record of request `key` (its data is `len` bytes). */
static __always_inline void emit_rec(__u64 key, __u64 len)
{
	struct uring_rec *rec = bpf_map_lookup_elem(&uring_recs, &key);
	__u32 zero = 0;
	__u64 *seq;

	if (!rec) {
		count_drop(); /* dropped by uring_gc_cb */
		return;
	}
	seq = bpf_map_lookup_elem(&seqctr, &zero);
	if (seq)
		rec->ev.seq = __sync_fetch_and_add(seq, 1);
	rec->ev.ts_ns = bpf_ktime_get_ns();
	if (len > CD_DATA_MASK + 1)
		len = CD_DATA_MASK + 1;
	if (bpf_ringbuf_output(&events, rec, sizeof(struct cd_event) + len, 0))
		count_drop();
}

/* The completion of io_uring path request `reqp` with result `res`. */
__noinline int uring_path_complete(__u64 reqp, __u64 res)
{
	__u64 key = reqp;
	struct uring_pend *p = bpf_map_lookup_elem(&uring_pend, &key);
	__u32 state, len;

	if (!p) {
		/* submitted before we attached, or evicted: unknown, so lost */
		if ((__s64)res >= 0)
			count_drop();
		bpf_map_delete_elem(&uring_recs, &key);
		return 0;
	}
	state = p->state;
	len = p->len;
	bpf_map_delete_elem(&uring_pend, &key);
	if ((__s64)res >= 0 && state == UP_REC)
		emit_rec(key, len);
	bpf_map_delete_elem(&uring_recs, &key);
	return 0;
}

static __always_inline int is_path_op(__u8 op)
{
	return op == IOP_RENAMEAT || op == IOP_UNLINKAT || op == IOP_MKDIRAT || op == IOP_SYMLINKAT ||
	       op == IOP_LINKAT;
}

/* Tracepoint argument `i` as a plain number: the verifier lets global functions
 * take no kernel pointers, so they get the request's address this way. */
static __always_inline __u64 arg_scalar(unsigned long long *ctx, __u32 i)
{
	__u64 v = 0;

	bpf_probe_read_kernel(&v, sizeof(v), &ctx[i]);
	return v;
}

static __always_inline int uring_submit(unsigned long long *ctx, struct io_kiocb *req)
{
	__u8 op = BPF_CORE_READ(req, opcode);

	if (op == IOP_CLOSE) {
		struct io_close *c = (struct io_close *)&req->cmd;
		int fd = BPF_CORE_READ(c, fd);
		__u32 slot_no = BPF_CORE_READ(c, file_slot);
		if (!slot_no)
			close_fd(SLOT_URING_SUBMIT, fd, CD_F_IO_URING);
	} else if (is_path_op(op)) {
		uring_path_submit(arg_scalar(ctx, 0), op);
	}
	return 0;
}

/* 6.4+: io_uring_submit_req(struct io_kiocb *req) */
SEC("tp_btf/io_uring_submit_req")
int BPF_PROG(cd_uring_submit_req, void *req)
{
	return uring_submit(ctx, (struct io_kiocb *)req);
}

/* 5.19..6.3: io_uring_submit_sqe(struct io_kiocb *req, bool force_nonblock) */
SEC("tp_btf/io_uring_submit_sqe")
int BPF_PROG(cd_uring_submit_sqe, void *req)
{
	return uring_submit(ctx, (struct io_kiocb *)req);
}

/* io_uring_complete(ctx, req, ...): `req` is the second argument on 5.19..6.18+;
 * the result is read from req->cqe.res (filled before the tracepoint fires). */
SEC("tp_btf/io_uring_complete")
int BPF_PROG(cd_uring_complete, void *ctx_, void *req_)
{
	struct io_kiocb *req = req_;
	struct uring_last *last;
	__u32 zero = 0;
	__s32 res;
	__u8 op;

	if (!req)
		return 0;
	op = BPF_CORE_READ(req, opcode);
	res = BPF_CORE_READ(req, cqe.res);
	last = bpf_map_lookup_elem(&uring_last, &zero);
	if (last) {
		last->ctx = (__u64)ctx_;
		last->user_data = BPF_CORE_READ(req, cqe.user_data);
		last->res = res;
		last->valid = 1;
	}
	switch (op) {
	case IOP_WRITEV:
	case IOP_WRITE_FIXED:
	case IOP_WRITE:
	case IOP_WRITEV_FIXED:
	case IOP_FALLOCATE:
	case IOP_SPLICE:
	case IOP_FTRUNCATE:
	case IOP_OPENAT:
	case IOP_OPENAT2:
		break;
	case IOP_RENAMEAT:
	case IOP_UNLINKAT:
	case IOP_MKDIRAT:
	case IOP_SYMLINKAT:
	case IOP_LINKAT:
		uring_path_complete(arg_scalar(ctx, 1), (__s64)res);
		return 0;
	default:
		return 0;
	}
	if (res < 0)
		return 0;
	if (op == IOP_OPENAT || op == IOP_OPENAT2) {
		struct io_open *o = (struct io_open *)&req->cmd;
		__u64 oflags;
		if (BPF_CORE_READ(o, file_slot))
			return 0; /* direct (fixed-file) open: no fd to track */
		oflags = BPF_CORE_READ(o, how.flags);
		open_done(SLOT_URING_COMPLETE, res, oflags, CD_F_IO_URING);
		return 0;
	}
	if (res == 0 && op != IOP_FALLOCATE && op != IOP_FTRUNCATE)
		return 0;
	fd_event(SLOT_URING_COMPLETE, CD_K_MODIFY, CD_F_IO_URING | (op == IOP_FTRUNCATE ? CD_F_TRUNC : 0),
		 (__u64)BPF_CORE_READ(req, file));
	return 0;
}

struct ovf_ctx {
	__u64 ctx;
	__u64 user_data;
	__u64 key;
	__u32 n; /* matches: 0, 1 or 2 (more than one) */
	__u32 pad;
};

static long uring_ovf_cb(void *map, __u64 *key, struct uring_rec *rec, struct ovf_ctx *c)
{
	struct uring_pend *p = bpf_map_lookup_elem(&uring_pend, key);

	if (p && p->ctx == c->ctx && p->user_data == c->user_data) {
		c->n = c->n ? 2 : 1; /* saturating, so the verifier's states converge */
		c->key = *key;
	}
	return 0;
}

/*
 * io_uring_cqe_overflow(ctx, user_data, res, cflags, ocqe): a completion that did
 * not fit in the CQ ring. Newer kernels (6.18) fire no io_uring_complete for it,
 * so a path request inside a root is found here by (ctx, user_data). On kernels
 * that fire both (6.1), io_uring_complete already handled it: uring_last tells.
 */
SEC("tp_btf/io_uring_cqe_overflow")
int BPF_PROG(cd_uring_cqe_overflow, void *ctx_, __u64 user_data, __s32 res)
{
	struct ovf_ctx c = {};
	struct uring_last *last;
	__u32 zero = 0;
	int seen = 0;

	last = bpf_map_lookup_elem(&uring_last, &zero);
	if (last) {
		seen = last->valid && last->ctx == (__u64)ctx_ && last->user_data == user_data &&
		       last->res == res;
		last->valid = 0;
	}
	c.ctx = (__u64)ctx_;
	c.user_data = user_data;
	bpf_for_each_map_elem(&uring_recs, uring_ovf_cb, &c, 0);
	if (c.n == 0)
		return 0;
	if (c.n == 1 && !seen) {
		uring_path_complete(c.key, (__s64)res);
		return 0;
	}
	/* several requests in flight share this user_data, or this completion was
	 * already seen: which one completed is unknown */
	if (res >= 0)
		count_drop();
	return 0;
}

/* ---- feature probes (loaded only by cd_ebpf::probe(), never by Capture) ---- */

SEC("fentry/vfs_write")
int BPF_PROG(cd_probe_fentry)
{
	return 0;
}

SEC("lsm/file_open")
int BPF_PROG(cd_probe_lsm, struct file *file)
{
	return 0;
}
