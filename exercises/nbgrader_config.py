# nbgrader's course: run nbgrader from this directory (exercises/). Solution notebooks are in
# source/<exercise>/; `nbgrader generate_assignment <exercise>` writes the student version to
# release/, `nbgrader autograde <exercise>` grades submitted/<student>/<exercise>/.
c = get_config()  # noqa: F821 - nbgrader's config loader provides it

c.CourseDirectory.course_id = "vlab"
# What a student sees where a solution was: the checks turn this into "not written yet".
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
# A check runs a guest on KVM (tcg without it): seconds, not minutes.
c.Execute.timeout = 120
