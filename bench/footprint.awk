# Reads a valgrind lackey trace (--trace-mem=yes --trace-syscalls=yes) of one daemon, as
# bench/ping-instructions.sh FOOTPRINT=1 makes it. Run with -v N=count.
# Cuts a lackey trace (--trace-mem=yes --trace-syscalls=yes) into steps at every blocking
# wait, keeps the steps that moved a packet, and prints the distinct code and data cache lines
# and pages of each kind of step, averaged over the last N of that kind.
function flush(   kind, n) {
    kind = ""
    if (has_recv) kind = "reply"
    else if (has_read && has_send) kind = "request"
    if (kind != "") {
        n = ++count[kind]
        cl[kind, n] = ncl; dl[kind, n] = ndl; cp[kind, n] = ncp; dp[kind, n] = ndp
    }
    delete seen_cl; delete seen_dl; delete seen_cp; delete seen_dp
    ncl = ndl = ncp = ndp = 0; has_recv = has_read = has_send = 0
}
/^SYSCALL\[/ {
    if (match($0, /\) sys_[a-z_0-9]+ \(/)) {
        name = substr($0, RSTART + 2, RLENGTH - 4)
        if (name ~ /^sys_(recvmmsg|recvfrom|recvmsg)$/) has_recv = 1
        if (name == "sys_read") has_read = 1
        if (name ~ /^sys_(sendmsg|sendto|sendmmsg)$/) has_send = 1
        if (name ~ /^sys_(poll|ppoll|epoll_wait|epoll_pwait|clock_nanosleep|nanosleep|futex)$/) flush()
    }
    next
}
/^I  / {
    a = substr($0, 4); sub(/,.*/, "", a)
    l = substr(a, 1, length(a) - 2) ":" int((index("0123456789abcdef", substr(a, length(a) - 1, 1)) - 1) / 4)
    if (!(l in seen_cl)) { seen_cl[l]; ncl++ }
    p = substr(a, 1, length(a) - 3)
    if (!(p in seen_cp)) { seen_cp[p]; ncp++ }
    next
}
/^ [LSM] / {
    a = substr($0, 4); sub(/,.*/, "", a)
    l = substr(a, 1, length(a) - 2) ":" int((index("0123456789abcdef", substr(a, length(a) - 1, 1)) - 1) / 4)
    if (!(l in seen_dl)) { seen_dl[l]; ndl++ }
    p = substr(a, 1, length(a) - 3)
    if (!(p in seen_dp)) { seen_dp[p]; ndp++ }
}
END {
    flush()
    split("request reply", kinds, " ")
    for (k = 1; k <= 2; k++) {
        kind = kinds[k]; n = count[kind]; from = n - N + 1; if (from < 1) from = 1
        s1 = s2 = s3 = s4 = 0
        for (i = from; i <= n; i++) { s1 += cl[kind, i]; s2 += dl[kind, i]; s3 += cp[kind, i]; s4 += dp[kind, i] }
        m = n - from + 1; if (m < 1) continue
        printf "%s %.1f %.1f %.1f %.1f\n", kind, s1 / m, s2 / m, s3 / m, s4 / m
    }
}
