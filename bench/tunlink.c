/* The lossy link of bench/lossy_link.py in C: packets between two TUN devices, serialised at a rate,
 * delayed, some lost at random and some dropped by a full router queue (tail drop).  The same model as the
 * Python Direction class there, which forwards each packet with a dozen interpreted steps and so, at
 * 200 Mbit/s, takes most of a core from the machine it measures; this one takes a few percent.
 *
 *   tunlink FD_A FD_B RATE_BIT_PER_S DELAY_S LOSS QUEUE_S SEED
 *
 * FD_A and FD_B are open, non-blocking TUN devices (inherited).  Runs until its standard input closes,
 * then prints "passed lost" for A->B and for B->A, one line each.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SLOTS 16384           /* packets a direction can hold (queue plus those in their delay) */
#define SLOT_BYTES 2048       /* a TUN device's packets are at most its MTU (1500) */
#define BATCH 64

struct direction {
    int source, target;
    double rate, delay, loss, queue_s, link_free;
    uint64_t random_state, passed, lost;
    unsigned head, count;
    double due[SLOTS];
    unsigned short length[SLOTS];
    unsigned char *bytes;
};

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double uniform(struct direction *d) {  /* xorshift64*: enough for loss decisions */
    uint64_t x = d->random_state;
    x ^= x >> 12; x ^= x << 25; x ^= x >> 27;
    d->random_state = x;
    return (double)((x * 2685821657736338717ULL) >> 11) / 9007199254740992.0;
}

static void take(struct direction *d) {
    for (int n = 0; n < BATCH; n++) {
        unsigned char packet[SLOT_BYTES];
        ssize_t got = read(d->source, packet, sizeof packet);
        if (got <= 0)
            return;
        double now = now_s(), start = now > d->link_free ? now : d->link_free;
        if (uniform(d) < d->loss || start - now > d->queue_s || d->count == SLOTS) {
            d->lost++;
            continue;
        }
        d->link_free = start + got * 8.0 / d->rate;
        unsigned slot = (d->head + d->count) % SLOTS;
        d->due[slot] = d->link_free + d->delay;
        d->length[slot] = (unsigned short)got;
        memcpy(d->bytes + (size_t)slot * SLOT_BYTES, packet, (size_t)got);
        d->count++;
    }
}

static void deliver(struct direction *d, double now) {
    while (d->count && d->due[d->head] <= now) {
        if (write(d->target, d->bytes + (size_t)d->head * SLOT_BYTES, d->length[d->head]) < 0 && errno == EAGAIN)
            return;  /* the other side's queue is full: try again on the next turn */
        d->passed++;
        d->head = (d->head + 1) % SLOTS;
        d->count--;
    }
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: tunlink FD_A FD_B RATE DELAY LOSS QUEUE_S SEED\n");
        return 2;
    }
    struct direction d[2];
    for (int i = 0; i < 2; i++) {
        memset(&d[i], 0, sizeof d[i]);
        d[i].source = atoi(argv[1 + i]);
        d[i].target = atoi(argv[2 - i]);
        d[i].rate = atof(argv[3]);
        d[i].delay = atof(argv[4]);
        d[i].loss = atof(argv[5]);
        d[i].queue_s = atof(argv[6]);
        d[i].random_state = (uint64_t)atoll(argv[7]) * 2 + i + 1;
        d[i].bytes = malloc((size_t)SLOTS * SLOT_BYTES);
        if (!d[i].bytes)
            return 1;
    }
    struct pollfd fds[3] = {{d[0].source, POLLIN, 0}, {d[1].source, POLLIN, 0}, {0, POLLIN, 0}};
    for (;;) {
        double now = now_s(), wait = 0.05;
        for (int i = 0; i < 2; i++)
            if (d[i].count && d[i].due[d[i].head] - now < wait)
                wait = d[i].due[d[i].head] - now;
        struct timespec timeout = {0, 0};
        if (wait > 0) {
            timeout.tv_sec = (time_t)wait;
            timeout.tv_nsec = (long)((wait - (double)timeout.tv_sec) * 1e9);
        }
        if (ppoll(fds, 3, &timeout, NULL) < 0 && errno != EINTR)
            return 1;
        if (fds[2].revents)
            break;  /* standard input closed (or readable): the measurement is over */
        for (int i = 0; i < 2; i++)
            if (fds[i].revents & POLLIN)
                take(&d[i]);
        now = now_s();
        for (int i = 0; i < 2; i++)
            deliver(&d[i], now);
    }
    for (int i = 0; i < 2; i++)
        printf("%llu %llu\n", (unsigned long long)d[i].passed, (unsigned long long)d[i].lost);
    return 0;
}
