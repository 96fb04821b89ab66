/*
 * pause: PID 1 of every pod sandbox on Weft's test node (image weft.local/pause).
 *
 * The sandbox container only holds the pod's namespaces open while the app containers come and
 * go. As PID 1 it has two jobs the kernel gives no default for: it must exit on SIGINT/SIGTERM
 * (signals without a handler are ignored by PID 1, so a stop would wait for SIGKILL), and it
 * must reap the children re-parented to it when the pod shares its PID namespace.
 * Built with `gcc -Os -static` (weft_e2e::images::build_pause), so the image needs no libc.
 */
#include <errno.h>
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int sig) {
    (void)sig;
    _exit(0);
}

static void reap(int sig) {
    int saved = errno;
    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

int main(void) {
    struct sigaction sa = {.sa_handler = stop};
    if (sigaction(SIGINT, &sa, NULL) < 0 || sigaction(SIGTERM, &sa, NULL) < 0) return 1;
    sa.sa_handler = reap;
    sa.sa_flags = SA_NOCLDSTOP | SA_RESTART;
    if (sigaction(SIGCHLD, &sa, NULL) < 0) return 2;
    for (;;) pause();
}
