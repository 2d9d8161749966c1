//! The seccomp filter every sandbox runs under, as a classic BPF program in
//! the byte form `bwrap --seccomp FD` reads.
//!
//! It is a deny list on top of the namespaces and dropped capabilities:
//! calls that reach kernel surface a CLI never needs (module loading,
//! mounts, new namespaces, keyrings, BPF, perf, io_uring, ptrace) answer
//! `EPERM`; `clone3` answers `ENOSYS` so libc falls back to `clone`,
//! whose flags can be checked; a foreign architecture or the x32 ABI ends
//! the process. Everything else is allowed.

const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
const JSET_K: u16 = 0x45; // BPF_JMP | BPF_JSET | BPF_K
const RET_K: u16 = 0x06; // BPF_RET | BPF_K

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_ERRNO: u32 = 0x0005_0000;

// struct seccomp_data { int nr; u32 arch; u64 ip; u64 args[6]; }
const OFF_NR: u32 = 0;
const OFF_ARCH: u32 = 4;
const OFF_ARG0_LO: u32 = 16;
const OFF_ARG1_LO: u32 = 24;

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME.
const CLONE_NEW_ANY: u32 = 0x0002_0000
    | 0x0200_0000
    | 0x0400_0000
    | 0x0800_0000
    | 0x1000_0000
    | 0x2000_0000
    | 0x4000_0000
    | 0x0000_0080;
const TIOCSTI: u32 = 0x5412;

/// System calls answered with `EPERM`.
pub fn denied() -> Vec<(&'static str, i64)> {
    use libc::*;
    let mut v = vec![
        ("mount", SYS_mount),
        ("umount2", SYS_umount2),
        ("pivot_root", SYS_pivot_root),
        ("swapon", SYS_swapon),
        ("swapoff", SYS_swapoff),
        ("reboot", SYS_reboot),
        ("kexec_load", SYS_kexec_load),
        ("kexec_file_load", SYS_kexec_file_load),
        ("init_module", SYS_init_module),
        ("finit_module", SYS_finit_module),
        ("delete_module", SYS_delete_module),
        ("bpf", SYS_bpf),
        ("perf_event_open", SYS_perf_event_open),
        ("userfaultfd", SYS_userfaultfd),
        ("keyctl", SYS_keyctl),
        ("add_key", SYS_add_key),
        ("request_key", SYS_request_key),
        ("acct", SYS_acct),
        ("quotactl", SYS_quotactl),
        ("open_by_handle_at", SYS_open_by_handle_at),
        ("name_to_handle_at", SYS_name_to_handle_at),
        ("ptrace", SYS_ptrace),
        ("process_vm_readv", SYS_process_vm_readv),
        ("process_vm_writev", SYS_process_vm_writev),
        ("setns", SYS_setns),
        ("unshare", SYS_unshare),
        ("syslog", SYS_syslog),
        ("vhangup", SYS_vhangup),
        ("io_uring_setup", SYS_io_uring_setup),
        ("io_uring_enter", SYS_io_uring_enter),
        ("io_uring_register", SYS_io_uring_register),
        ("open_tree", SYS_open_tree),
        ("move_mount", SYS_move_mount),
        ("fsopen", SYS_fsopen),
        ("fsconfig", SYS_fsconfig),
        ("fsmount", SYS_fsmount),
        ("fspick", SYS_fspick),
        ("mount_setattr", SYS_mount_setattr),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([("iopl", SYS_iopl), ("ioperm", SYS_ioperm)]);
    v
}

fn stmt(code: u16, k: u32) -> [u8; 8] {
    jump(code, k, 0, 0)
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0..2].copy_from_slice(&code.to_ne_bytes());
    b[2] = jt;
    b[3] = jf;
    b[4..8].copy_from_slice(&k.to_ne_bytes());
    b
}

/// The filter as `struct sock_filter` records in native byte order.
pub fn program() -> Vec<u8> {
    let eperm = RET_ERRNO | libc::EPERM as u32;
    let mut p: Vec<[u8; 8]> = vec![
        stmt(LD_W_ABS, OFF_ARCH),
        jump(JEQ_K, AUDIT_ARCH, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, OFF_NR),
    ];
    #[cfg(target_arch = "x86_64")]
    p.extend([
        jump(JGE_K, 0x4000_0000, 0, 1),
        stmt(RET_K, RET_KILL_PROCESS),
    ]);
    for (_, nr) in denied() {
        p.extend([jump(JEQ_K, nr as u32, 0, 1), stmt(RET_K, eperm)]);
    }
    p.extend([
        jump(JEQ_K, libc::SYS_clone3 as u32, 0, 1),
        stmt(RET_K, RET_ERRNO | libc::ENOSYS as u32),
        // clone: refuse namespace flags (in the low word of the first
        // argument on both architectures).
        jump(JEQ_K, libc::SYS_clone as u32, 0, 4),
        stmt(LD_W_ABS, OFF_ARG0_LO),
        jump(JSET_K, CLONE_NEW_ANY, 0, 1),
        stmt(RET_K, eperm),
        stmt(RET_K, RET_ALLOW),
        // ioctl(fd, TIOCSTI, …) would push keystrokes into a terminal.
        jump(JEQ_K, libc::SYS_ioctl as u32, 0, 3),
        stmt(LD_W_ABS, OFF_ARG1_LO),
        jump(JEQ_K, TIOCSTI, 0, 1),
        stmt(RET_K, eperm),
        stmt(RET_K, RET_ALLOW),
    ]);
    p.concat()
}
