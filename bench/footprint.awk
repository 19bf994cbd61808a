# Reads a valgrind lackey trace (--trace-mem=yes --trace-syscalls=yes) of one daemon, as
# bench/ping-instructions.sh FOOTPRINT=1 makes it. Run with -v N=count.
#
# Cuts the trace into steps, one thread at a time: a thread's step ends at its own blocking
# wait (poll, epoll_wait, a futex wait, a sleep). Valgrind runs one thread at a time, and a
# thread that resumes prints its system call's result before it touches anything, so every
# access belongs to the thread named by the last SYSCALL line. A step that received a
# datagram is a "reply" step (UDP in, TUN out); one that read a packet from the TUN and sent a
# datagram is a "request" step. For each kind it prints the distinct 64-byte code and data
# lines and 4 KiB code and data pages, averaged over the last N steps, and how many it found:
#   kind code_lines data_lines code_pages data_pages steps
function flush(t,   kind, n) {
    kind = ""
    if (recv[t]) kind = "reply"
    else if (rd[t] && snd[t]) kind = "request"
    if (kind != "") {
        n = ++count[kind]
        cl[kind, n] = ncl[t]; dl[kind, n] = ndl[t]; cp[kind, n] = ncp[t]; dp[kind, n] = ndp[t]
    }
    gen[t]++
    ncl[t] = ndl[t] = ncp[t] = ndp[t] = 0
    recv[t] = rd[t] = snd[t] = 0
}
# Address (hex, no 0x) to its 64-byte line and its 4 KiB page, as strings.
function line_of(a) {
    return substr(a, 1, length(a) - 2) ":" int((index("0123456789abcdef", substr(a, length(a) - 1, 1)) - 1) / 4)
}
function page_of(a) { return substr(a, 1, length(a) - 3) }
function touch(kind, a,   l, p) {
    l = line_of(a); p = page_of(a)
    if (kind == "I") {
        if (sl[cur, l] != gen[cur] + 1) { sl[cur, l] = gen[cur] + 1; ncl[cur]++ }
        if (sp[cur, p] != gen[cur] + 1) { sp[cur, p] = gen[cur] + 1; ncp[cur]++ }
    } else {
        if (dsl[cur, l] != gen[cur] + 1) { dsl[cur, l] = gen[cur] + 1; ndl[cur]++ }
        if (dsp[cur, p] != gen[cur] + 1) { dsp[cur, p] = gen[cur] + 1; ndp[cur]++ }
    }
}
/^SYSCALL\[/ {
    t = $0; sub(/^SYSCALL\[[0-9]+,/, "", t); sub(/\].*/, "", t)
    cur = t
    if (!match($0, /\) sys_[a-z_0-9]+ \(/)) {
        # A call's result, on a line of its own ("... --> Success(...)" or Failure): a
        # receive or read that found nothing (EAGAIN) does not make a packet step.
        if (index($0, "--> Success(") > 0) {
            name = pending[t]
            if (name ~ /^sys_(recvmmsg|recvfrom|recvmsg)$/) recv[t] = 1
            if (name == "sys_read") rd[t] = 1
            if (name ~ /^sys_(sendmsg|sendto|sendmmsg|send)$/) snd[t] = 1
        }
        next
    }
    name = substr($0, RSTART + 2, RLENGTH - 4)
    pending[t] = name
    wait = name ~ /^sys_(poll|ppoll|epoll_wait|epoll_pwait|clock_nanosleep|nanosleep)$/
    if (name == "sys_futex") {
        # Only FUTEX_WAIT and FUTEX_WAIT_BITSET (private or not) block.
        op = $0; sub(/^[^(]*\( *[^,]*, */, "", op); sub(/[,)].*/, "", op)
        op = op % 128
        wait = op == 0 || op == 9
    }
    if (wait) flush(t)
    next
}
/^I  / { a = substr($0, 4); sub(/,.*/, "", a); touch("I", a); next }
/^ [LSM] / { a = substr($0, 4); sub(/,.*/, "", a); touch("D", a) }
END {
    split("request reply", kinds, " ")
    for (k = 1; k <= 2; k++) {
        kind = kinds[k]; n = count[kind]; from = n - N + 1; if (from < 1) from = 1
        m = n - from + 1; if (n < 1) continue
        s1 = s2 = s3 = s4 = 0
        for (i = from; i <= n; i++) { s1 += cl[kind, i]; s2 += dl[kind, i]; s3 += cp[kind, i]; s4 += dp[kind, i] }
        printf "%s %.1f %.1f %.1f %.1f %d\n", kind, s1 / m, s2 / m, s3 / m, s4 / m, m
    }
}
