"""A selection of tests/test_flower.py for mutation runs of flower_app.py (not collected
by pytest: its name does not start with test_): every test but the three with SuperNode
processes (minutes each), and of the parametrised ones the cases listed here.

    cpuslot python bench/mutate.py flower_app.py --tests tests/_mut_flower_sel.py
"""
import pytest
import test_flower as tf
from test_flower import tiny_clip  # noqa: F401 - a fixture of the cases below

WHOLE = [  # test_flower's tests taken as they are (their own parameters, if any)
    "test_fcu_on_flower_ends_as_run_py",
    "test_fcu_on_flower_stopped_in_its_original_run_and_resumed_ends_as_run_py",
    "test_pga_on_flower_needs_u_s_state_of_the_original_run",
    "test_fedal_stopped_mid_acquisition_phase_and_resumed_on_shared_nodes_ends_as_run_py",
    "test_every_registered_method_is_either_checked_on_flower_or_refused",
    "test_a_lost_client_is_logged_and_the_round_completes_with_the_others",
    "test_the_flower_byte_and_second_counters_add_up_every_message",
    "test_two_nodes_that_claim_one_client_before_round_1_fail_in_one_line",
    "test_a_held_out_client_s_node_that_joins_late_is_waited_for",
    "test_a_method_that_reads_a_client_s_state_where_it_is_not_fails_in_one_line",
    "test_nodes_sharing_one_process_end_as_run_py",
    "test_a_private_tensor_that_goes_nan_on_a_node_stops_the_run_in_one_line",
    "test_a_node_whose_data_folder_is_missing_fails_in_one_line",
    "test_isic_nodes_without_a_data_dir_read_the_run_s_folder",
    "test_a_step_two_wrappers_down_runs_on_the_nodes",
    "test_a_second_node_for_a_client_after_round_1_replaces_the_first",
    "test_methods_that_read_a_client_s_data_elsewhere_are_refused_on_flower",
]
globals().update({name: getattr(tf, name) for name in WHOLE})


@pytest.mark.parametrize("name", ["fedal", "fedal_sampled", "fedal_faults", "fedbn_holdout", "dp",
                                  "clip_svm"])
def test_parity(tmp_path, tiny_clip, name):  # noqa: F811
    tf.test_every_method_on_flower_ends_as_run_py(tmp_path, tiny_clip, name)


def test_wait_rejoin(tmp_path):
    tf.test_on_dropout_wait_sends_again_to_the_node_that_comes_back_and_ends_as_run_py(
        tmp_path, "train", 2)


def test_isic(tmp_path):
    tf.test_isic_sites_holding_only_their_own_images_and_a_server_with_none_end_as_run_py(
        tmp_path, "--algo fedavg --bn local")
