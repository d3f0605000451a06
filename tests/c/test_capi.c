/*
 * The C ABI from C: version, workspace size, the CPU reference on a case
 * small enough to compute by hand, every kind of bad argument, and loss
 * creation (MULTIBOX_NO_DEVICE without a GPU, MULTIBOX_OK with one).
 * Built and run by tests/c_abi.rs; exits non-zero on the first failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "multibox.h"

static int failures = 0;

#define CHECK(cond)                                                          \
    do {                                                                     \
        if (!(cond)) {                                                       \
            fprintf(stderr, "%s:%d: CHECK(%s) failed; last error: %s\n",      \
                    __FILE__, __LINE__, #cond, multibox_last_error());       \
            failures++;                                                      \
        }                                                                    \
    } while (0)

#define CHECK_NEAR(a, b, tol) CHECK(fabs((double)(a) - (double)(b)) <= (tol))

/* The call fails with INVALID_ARGUMENT and a message that names `what`. */
#define CHECK_INVALID(call, what)                                            \
    do {                                                                     \
        multibox_status_code code_ = (call);                                 \
        CHECK(code_ == MULTIBOX_INVALID_ARGUMENT);                           \
        CHECK(strstr(multibox_last_error(), (what)) != NULL);                \
        printf("  rejected as expected: %s\n", multibox_last_error());       \
    } while (0)

/*
 * One image, three priors, two classes (the example in src/reference.rs).
 * Every logit is 0, so each prior's cross-entropy is ln 2 and the two
 * background priors tie: with neg_pos_ratio 1 the one positive mines one
 * negative, the lower index. Prior 0 predicts (0.5, 0, 0, 2) against a zero
 * target: smooth-L1 0.125 + 1.5.
 */
enum { B = 1, P = 3, C = 2 };
static float confidence[B * P * C];
static float predicted[B * P * 4] = {0.5f, 0.0f, 0.0f, 2.0f};
static float gt[B * P * 4];
static int64_t labels64[B * P] = {1, 0, 0};
static int32_t labels32[B * P] = {1, 0, 0};
static float grad_confidence[B * P * C];
static float grad_locations[B * P * 4];
static uint8_t mask[B * P];

static multibox_host_call_f32 small_call(void) {
    multibox_host_call_f32 call;
    CHECK(multibox_host_call_default(&call) == MULTIBOX_OK);
    CHECK(call.g_reg == 1.0f && call.g_cls == 1.0f && call.confidence == NULL && call.mask_len == 0);
    CHECK(call.layout == MULTIBOX_ROW_MAJOR && call.normalizer == MULTIBOX_NORMALIZE_POSITIVES);
    call.shape.batch = B;
    call.shape.priors = P;
    call.shape.classes = C;
    call.label_type = MULTIBOX_I64;
    call.confidence = confidence;
    call.confidence_len = B * P * C;
    call.predicted_locations = predicted;
    call.predicted_locations_len = B * P * 4;
    call.labels = labels64;
    call.labels_len = B * P;
    call.gt_locations = gt;
    call.gt_locations_len = B * P * 4;
    call.grad_confidence = grad_confidence;
    call.grad_confidence_len = B * P * C;
    call.grad_locations = grad_locations;
    call.grad_locations_len = B * P * 4;
    call.mask = mask;
    call.mask_len = B * P;
    return call;
}

static void check_small_case(const multibox_config *config, multibox_host_call_f32 call) {
    multibox_losses losses;
    memset(grad_confidence, 0x7f, sizeof grad_confidence);
    memset(mask, 7, sizeof mask);
    CHECK(multibox_reference_forward_backward_f32(config, &call, &losses) == MULTIBOX_OK);
    CHECK(losses.num_pos == 1);
    CHECK_NEAR(losses.classification_loss, 2.0 * log(2.0), 1e-12);
    CHECK_NEAR(losses.regression_loss, 1.625, 0.0);
    CHECK(mask[0] == 1 && mask[1] == 1 && mask[2] == 0);
    const float want_conf[B * P * C] = {0.5f, -0.5f, -0.5f, 0.5f, 0.0f, 0.0f};
    for (int i = 0; i < B * P * C; i++) CHECK(grad_confidence[i] == want_conf[i]);
    const float want_loc[4] = {0.5f, 0.0f, 0.0f, 1.0f};
    for (int i = 0; i < B * P * 4; i++) CHECK(grad_locations[i] == (i < 4 ? want_loc[i] : 0.0f));
}

int main(void) {
    printf("multibox %s\n", multibox_version());
    CHECK(strlen(multibox_version()) > 0);
    CHECK(strcmp(multibox_last_error(), "") == 0);
    /* The library was built from this header. */
    CHECK(multibox_abi() == MULTIBOX_ABI_HASH);

    /* Workspace size */
    size_t bytes = 0;
    CHECK(multibox_workspace_bytes(4, 3000, 21, &bytes) == MULTIBOX_OK);
    CHECK(bytes > 0);
    printf("workspace for [4, 3000, 21]: %zu bytes\n", bytes);
    CHECK_INVALID(multibox_workspace_bytes(4, 3000, 21, NULL), "out");
    CHECK_INVALID(multibox_workspace_bytes(4, 3000, 1, &bytes), "C (classes)");
    CHECK_INVALID(multibox_workspace_bytes(0, 3000, 21, &bytes), "B (batch)");

    /* The reference on the hand-computed case, i64 then i32 labels */
    multibox_config config;
    CHECK(multibox_config_default(&config) == MULTIBOX_OK);
    CHECK(config.neg_pos_ratio == 3.0f && config.beta == 1.0f && config.min_negatives_per_image == 0);
    config.neg_pos_ratio = 1.0f;
    multibox_host_call_f32 call = small_call();
    check_small_case(&config, call);
    call.label_type = MULTIBOX_I32;
    call.labels = labels32;
    check_small_case(&config, call);

    /* A given divisor of 4 (say, the positives of four ranks): N / n = 1/4
     * of everything. Channel-major inputs: [B, C, P] and [B, 4, P]. */
    call = small_call();
    call.normalizer = MULTIBOX_NORMALIZE_GIVEN;
    call.normalizer_value = 4.0f;
    call.layout = MULTIBOX_CHANNEL_MAJOR;
    float predicted_cm[B * 4 * P] = {0};
    for (int j = 0; j < 4; j++) predicted_cm[j * P] = predicted[j];
    call.predicted_locations = predicted_cm;
    {
        multibox_losses given;
        CHECK(multibox_reference_forward_backward_f32(&config, &call, &given) == MULTIBOX_OK);
        CHECK(given.num_pos == 1);
        CHECK_NEAR(given.classification_loss, 0.5 * log(2.0), 1e-12);
        CHECK_NEAR(given.regression_loss, 1.625 / 4.0, 0.0);
        /* Class 1 of prior 0 is element 1 * P + 0 channel-major. */
        CHECK(grad_confidence[0] == 0.125f && grad_confidence[P] == -0.125f);
        CHECK(grad_locations[0] == 0.125f && grad_locations[3 * P] == 0.25f);
    }
    {
        multibox_losses unused;
        call.layout = 2;
        CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &unused), "layout 2");
        call.layout = MULTIBOX_ROW_MAJOR;
        call.normalizer = 7;
        CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &unused), "normalizer 7");
    }

    /* Forward only: gradients may be NULL; losses finite */
    call = small_call();
    call.grad_confidence = NULL;
    call.grad_locations = NULL;
    call.mask = NULL;
    multibox_losses losses;
    CHECK(multibox_reference_forward_f32(NULL, &call, &losses) == MULTIBOX_OK);
    CHECK(isfinite(losses.regression_loss) && isfinite(losses.classification_loss));
    CHECK(losses.num_pos == 1);
    /* Default ratio 3 mines both negatives: cls = 3 ln 2. */
    CHECK_NEAR(losses.classification_loss, 3.0 * log(2.0), 1e-12);

    /* Bad arguments: INVALID_ARGUMENT, a message naming the problem, nothing written */
    printf("bad arguments:\n");
    call = small_call();
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, NULL, &losses), "call");
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, NULL), "out");
    call.confidence = NULL;
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &losses), "confidence");
    call = small_call();
    call.confidence_len = 5;
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &losses), "confidence");
    call = small_call();
    call.labels_len = 2;
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &losses), "labels");
    call = small_call();
    call.grad_locations_len = 4;
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &losses), "grad_locations");
    call = small_call();
    call.grad_confidence = NULL;
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &losses), "grad_confidence");
    call = small_call();
    call.shape.classes = 1;
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &losses), "C (classes)");
    call = small_call();
    call.label_type = 7;
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &losses), "label_type 7");
    call = small_call();
    call.g_cls = NAN;
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &losses), "g_cls");
    call = small_call();
    int64_t bad_labels[B * P] = {1, 5, 0};
    call.labels = bad_labels;
    CHECK_INVALID(multibox_reference_forward_backward_f32(&config, &call, &losses), "label 5");
    multibox_config bad = config;
    bad.neg_pos_ratio = -1.0f;
    call = small_call();
    CHECK_INVALID(multibox_reference_forward_backward_f32(&bad, &call, &losses), "neg_pos_ratio");
    bad = config;
    bad.beta = 0.0f;
    multibox_loss *loss = (multibox_loss *)&bad; /* must be overwritten with NULL */
    CHECK_INVALID(multibox_loss_create(0, &bad, &loss), "beta");
    CHECK(loss == NULL);
    CHECK_INVALID(multibox_loss_create(0, &config, NULL), "out");
    CHECK_INVALID(multibox_loss_create(-1, &config, &loss), "device_ordinal");
    CHECK_INVALID(multibox_forward(NULL, NULL, NULL), "loss");
    CHECK_INVALID(multibox_forward_backward(NULL, NULL, NULL), "loss");
    multibox_shape shape = {B, P, C};
    multibox_device_status device_status;
    CHECK_INVALID(multibox_status(NULL, &shape, 0, 0, NULL, &device_status), "loss");
    CHECK(multibox_loss_destroy(NULL) == MULTIBOX_OK);

    /* The device: NO_DEVICE without one (a failure under
       MULTIBOX_REQUIRE_GPU=1, as for every GPU test); with one, a loss and
       calls the host can reject before any launch. */
    const char* require_env = getenv("MULTIBOX_REQUIRE_GPU");
    const int gpu_required = require_env != NULL && strcmp(require_env, "1") == 0;
    multibox_status_code code = multibox_loss_create(0, &config, &loss);
    if (code == MULTIBOX_NO_DEVICE) {
        printf("multibox_loss_create: MULTIBOX_NO_DEVICE (%s)\n", multibox_last_error());
        CHECK(!gpu_required);
        CHECK(loss == NULL);
        CHECK(strlen(multibox_last_error()) > 0);
    } else {
        CHECK(code == MULTIBOX_OK);
        CHECK(loss != NULL);
        printf("created a loss on device 0\n");
        CHECK_INVALID(multibox_forward(loss, NULL, NULL), "call");
        multibox_call device_call;
        CHECK(multibox_call_default(&device_call) == MULTIBOX_OK);
        device_call.shape = shape;
        device_call.dtype = MULTIBOX_F32;
        device_call.label_type = MULTIBOX_I64;
        CHECK_INVALID(multibox_forward(loss, &device_call, NULL), "null");
        /* The backward ignores the normaliser (its forward's is in the
           workspace): a stale value is no error there. */
        device_call.normalizer = 7;
        CHECK_INVALID(multibox_forward(loss, &device_call, NULL), "normalizer 7");
        CHECK_INVALID(multibox_backward(loss, &device_call, NULL), "null");
        device_call.normalizer = MULTIBOX_NORMALIZE_POSITIVES;
        device_call.dtype = 9;
        CHECK_INVALID(multibox_forward_backward(loss, &device_call, NULL), "dtype 9");
        CHECK_INVALID(multibox_status(loss, &shape, 0, 0, NULL, &device_status), "workspace");
        CHECK(multibox_loss_destroy(loss) == MULTIBOX_OK);
    }

    /* Target assignment: the standard priors, the CPU reference on one box
       (the prior that contains it best is positive), and the refusals. */
    {
        size_t n = 0;
        CHECK(multibox_standard_priors(MULTIBOX_PRIORS_SSDLITE300, NULL, 0, &n) == MULTIBOX_OK);
        CHECK(n == 3000 * 4);
        static float priors[3000 * 4];
        CHECK(multibox_standard_priors(MULTIBOX_PRIORS_SSDLITE300, priors, n, &n) == MULTIBOX_OK);
        CHECK_INVALID(multibox_standard_priors(7, priors, n, &n), "kind");
        size_t untouched = 5; /* a failure writes nothing, not even the length */
        CHECK_INVALID(multibox_standard_priors(MULTIBOX_PRIORS_SSDLITE300, priors, 8, &untouched), "`out`");
        CHECK(untouched == 5);
        multibox_target_config tconfig;
        CHECK(multibox_target_config_default(&tconfig) == MULTIBOX_OK);
        CHECK(tconfig.iou_threshold == 0.5f && tconfig.center_variance == 0.1f && tconfig.size_variance == 0.2f);
        float boxes[4] = {0.1f, 0.1f, 0.4f, 0.5f};
        int64_t box_labels[1] = {7};
        int32_t counts[1] = {1};
        static int64_t labels[3000];
        static float locations[3000 * 4];
        multibox_target_host_call tcall = {
            .shape = {1, 3000, 1},
            .label_type = MULTIBOX_I64,
            .priors = priors, .priors_len = 3000 * 4,
            .gt_boxes = boxes, .gt_boxes_len = 4,
            .gt_labels = box_labels, .gt_labels_len = 1,
            .gt_counts = counts, .gt_counts_len = 1,
            .labels = labels, .labels_len = 3000,
            .gt_locations = locations, .gt_locations_len = 3000 * 4,
        };
        multibox_target_status tstatus;
        CHECK(multibox_reference_assign_targets(&tconfig, &tcall, &tstatus) == MULTIBOX_OK);
        CHECK(!tstatus.count_clamped && !tstatus.invalid_box_label && !tstatus.degenerate_box);
        int positives = 0;
        for (int i = 0; i < 3000; ++i) positives += labels[i] == 7;
        CHECK(positives >= 1);
        tcall.gt_locations_len -= 1;
        CHECK_INVALID(multibox_reference_assign_targets(&tconfig, &tcall, NULL), "gt_locations");
        tcall.gt_locations_len += 1;
        tconfig.iou_threshold = 0.0f;
        CHECK_INVALID(multibox_reference_assign_targets(&tconfig, &tcall, NULL), "iou_threshold");
        size_t bytes = 0;
        CHECK(multibox_target_workspace_bytes(32, 8732, 100, &bytes) == MULTIBOX_OK && bytes > 0);
        multibox_assigner* assigner = NULL;
        CHECK_INVALID(multibox_assigner_create(0, NULL, 0, NULL, &assigner), "priors");
        CHECK(assigner == NULL);
        CHECK_INVALID(multibox_assign_targets(NULL, NULL, NULL), "assigner");
        CHECK(multibox_assigner_destroy(NULL) == MULTIBOX_OK);
        code = multibox_assigner_create(0, priors, 3000 * 4, NULL, &assigner);
        CHECK(code == MULTIBOX_OK || (code == MULTIBOX_NO_DEVICE && !gpu_required));
        if (code == MULTIBOX_OK) {
            CHECK_INVALID(multibox_assign_targets(assigner, NULL, NULL), "call");
            CHECK(multibox_assigner_destroy(assigner) == MULTIBOX_OK);
        }
    }

    if (failures) {
        fprintf(stderr, "%d C ABI check(s) failed\n", failures);
        return 1;
    }
    printf("all C ABI checks passed\n");
    return 0;
}
