/* A statically linked program: `samepage run` must refuse it (LD_PRELOAD
 * cannot reach it, and its KSM calls would go to kernel KSM). If it runs,
 * it says so, which fails the test. */
#include <stdio.h>

int main(void) {
  puts("static program ran");
  return 0;
}
