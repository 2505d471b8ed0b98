from glob import glob

from setuptools import find_packages, setup

package_name = "twinbrain_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", glob("config/*.yaml")),
    ],
    # torch and transformers are installed by the Makefile (CPU torch first), not here.
    install_requires=["setuptools"],
    python_requires=">=3.10",
    zip_safe=True,
    maintainer="twinbrain_ros maintainers",
    maintainer_email="maintainers@twinbrain-ros.dev",
    description=(
        "TwinBrainVLA vision-language-action policy for ROS 2: asymmetric twin Qwen VLMs, "
        "DiT flow-matching action expert, policy node, training and simulation bridge"
    ),
    license="Apache-2.0",
    extras_require={"test": ["pytest"]},
    entry_points={
        "console_scripts": [
            "policy_node = twinbrain_ros.ros.policy_node:main",
            "policy_server = twinbrain_ros.serving.server:main",
            "make_tiny_checkpoint = twinbrain_ros.tools.make_tiny_checkpoint:main",
            "demo = twinbrain_ros.demo:main",
            "train = twinbrain_ros.train:main",
            "bag_to_dataset = twinbrain_ros.tools.bag_to_dataset:main",
            "sim_bridge = twinbrain_ros.ros.sim_bridge:main",
            "evaluate = twinbrain_ros.ros.evaluate:main",
            "record_demos = twinbrain_ros.sim.record:main",
        ],
    },
)
